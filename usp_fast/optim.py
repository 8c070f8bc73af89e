"""Parameter groups and the one learning-rate schedule every stage uses (the engine's stages and the linear probe)."""
import math

def decay_groups(model, weight_decay):
    """AdamW groups [decay, no decay]: timm's `param_groups_weight_decay` split with its defaults, as the official
    USP/MAE pretraining calls it: no decay for tensors with ndim <= 1 (biases, norms) and names ending in .bias;
    cls_token and mask_token ([1, 1, D]) are decayed (85 decayed tensors for usp_vit_b). The fixed sin-cos tables
    are buffers and never reach the optimizer. Both groups always, in this order, even with weight_decay 0 (where
    timm would merge them), so the optimizer-state layout never depends on the decay value."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, 1.0)  # any non-zero decay splits
    params = {g["weight_decay"]: g["params"] for g in groups}
    return [{"params": params.get(1.0, []), "weight_decay": weight_decay},
            {"params": params.get(0.0, []), "weight_decay": 0.0}]


def layer_decay_groups(model, weight_decay, layer_decay):
    """timm's layer-wise lr decay groups (each with 'lr_scale'); no decay on biases, norms, tokens, pos_embed."""
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                    layer_decay=layer_decay)


def base_lr(optim_cfg, batch):
    """The peak lr: optim.lr when set, else the MAE/USP scaling rule blr x batch / 256."""
    return optim_cfg.lr if optim_cfg.lr is not None else optim_cfg.blr * batch / 256


def warmup_length(warmup_epochs, warmup_steps, steps_per_epoch):
    """Warm-up in optimizer steps: `warmup_steps` when set, else warmup_epochs x steps_per_epoch (may be fractional)."""
    return warmup_steps if warmup_steps is not None else warmup_epochs * steps_per_epoch


def schedule_lr(step, base_lr, warmup_steps, total_steps, min_lr=0.0, schedule="cosine", power=1.0):
    """The lr of optimizer step `step` (0-based): linear warm-up from 0 over `warmup_steps`, then a half-cosine from
    base_lr to min_lr reached at `total_steps`, constant base_lr, or poly (mmseg's PolyLR after its LinearLR
    warm-up: min_lr + (base_lr - min_lr) x (1 - progress)^power)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule not in ("cosine", "poly"):
        raise ValueError(f"optim.schedule {schedule!r}: expected 'cosine', 'constant' or 'poly'")
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "poly":
        return min_lr + (base_lr - min_lr) * (1.0 - progress) ** power
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step, cfg, steps_per_epoch, total_steps, base_lr):
    """schedule_lr with cfg.optim's warm-up (optim.warmup_steps, else optim.warmup_epochs), min_lr and schedule."""
    o = cfg.optim
    warmup = warmup_length(o.warmup_epochs, o.warmup_steps, steps_per_epoch)
    return schedule_lr(step, base_lr, warmup, total_steps, o.min_lr, o.schedule, o.poly_power)
