"""Top-k accuracy, the one helper the fine-tuning and linear-probe stages report with (percent, as MAE)."""
import torch


@torch.no_grad()
def top_k_accuracy(logits_fn, inputs, labels, ks=(1, 5), batch=256):
    """logits_fn(inputs[lo:hi]) -> logits [n, C]. -> {'top1': %, 'top5': %, ..., 'correct': [1/0 per input for
    top-1]}; k is capped at the number of classes (top-5 of 3 classes is top-3, as timm's `accuracy`)."""
    hits, correct = {k: 0 for k in ks}, []
    for lo in range(0, len(labels), batch):
        logits = logits_fn(inputs[lo: lo + batch]).float()
        y = labels[lo: lo + batch].to(logits.device)
        ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
        for k in ks:
            hits[k] += int((ranked[:, :k] == y[:, None]).any(1).sum())
        correct += (ranked[:, 0] == y).int().tolist()
    n = max(len(labels), 1)
    return {**{f"top{k}": 100.0 * hits[k] / n for k in ks}, "correct": correct}
