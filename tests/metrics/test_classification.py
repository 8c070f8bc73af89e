"""The one top-k helper (fine-tuning and linear probe) against a hand count."""
import torch

from usp_fast.metrics.classification import top_k_accuracy


def test_top_k_accuracy_counts_by_hand_across_batches():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.35, 0.25, 0.4]])
    labels = torch.tensor([0, 2, 2, 1, 1])
    # top-1: rows 0 and 2; top-2: also rows 1 and 3 (their label is second); row 4's label is third
    acc = top_k_accuracy(lambda x: x, logits, labels, ks=(1, 2, 5), batch=2)
    assert acc["correct"] == [1, 0, 1, 0, 0]
    assert acc["top1"] == 40.0 and acc["top2"] == 80.0 and acc["top5"] == 100.0  # top-5 of 3 = top-3
