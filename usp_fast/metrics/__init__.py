"""Evaluation metrics: the offline TF-Inception feature extractor (`inception.py`) and ADM's generation metrics
(`generation.py`); the CLI is `usp_fast/evaluate.py`."""
