"""usp-fast: a performance-first trainer for USP (masked latent modelling pretraining, DiT/SiT transfer)."""
__version__ = "0.1.0"
