"""Single-scale semantic-segmentation scores as mmseg reports them for ADE20K: per-class IoU, mIoU, pixel accuracy
(aAcc) and mean class accuracy (mAcc), from one confusion matrix over every evaluated pixel.

The pixels are counted by torchmetrics' MulticlassConfusionMatrix (ignored pixels dropped); the scores are taken
from it here because mmseg's convention for a class absent from both the ground truth and the predictions of the
whole split -- IoU undefined (NaN), left out of the mean -- is not what torchmetrics' JaccardIndex returns per
class (its zero_division value, 0), and all four scores come from the one matrix.
"""
import math

import torch

IGNORE = 255


class SegmentationScore:
    def __init__(self, num_classes, ignore_index=IGNORE, device="cpu"):
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.num_classes = num_classes
        self.matrix = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False).to(device)

    def update(self, pred, target):
        """pred, target: int tensors of the same shape (class indices; target may hold ignore_index)."""
        self.matrix.update(pred.reshape(-1), target.reshape(-1).long())

    def compute(self, class_names=None):
        return scores(self.matrix.compute(), class_names)


def scores(confusion, class_names=None):
    """confusion [N, N] (rows: ground truth, columns: prediction) -> {'mIoU', 'aAcc', 'mAcc' (in %),
    'per_class': {name: {'iou', 'acc'} or None where undefined}, 'classes_present'}."""
    cm = confusion.double()
    tp, gt, pred = cm.diag(), cm.sum(1), cm.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
    names = class_names or [str(k) for k in range(len(tp))]

    def pct(v):
        return None if math.isnan(v) else 100.0 * v

    total = gt.sum().item()
    return {"mIoU": pct(torch.nanmean(iou).item()) if (union > 0).any() else None,
            "aAcc": pct(tp.sum().item() / total) if total else None,
            "mAcc": pct(torch.nanmean(acc).item()) if (gt > 0).any() else None,
            "per_class": {n: {"iou": pct(i), "acc": pct(a)} for n, i, a in zip(names, iou.tolist(), acc.tolist())},
            "classes_present": int((union > 0).sum().item()), "pixels": int(total)}
