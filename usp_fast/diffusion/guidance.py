"""Classifier-free guidance (Ho & Salimans 2022) as a model function for the samplers.

Guided channels: the prediction channels (epsilon for DiT, velocity for SiT) get uncond + s * (cond - uncond);
DiT's variance channels (C..2C-1) are never guided and come from the conditional pass. `guided_channels` limits
guidance to the first k latent channels: the official DiT/SiT samplers guide only channels 0-2 of the 4 SD-VAE
channels (k=3) "for exact reproducibility"; None guides all C.
"""
import torch


def guided_model(model, labels, cfg_scale=1.0, null_class=None, guided_channels=None):
    """-> model_fn(x, t) for GaussianDiffusion / LinearInterpolant samplers, conditioned on `labels` [B].
    cfg_scale == 1 is exactly the conditional model (one pass, no unconditional branch)."""
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, labels)
    if null_class is None:
        raise ValueError("classifier-free guidance needs a model trained with label dropout (a null class)")
    null = torch.full_like(labels, null_class)

    def model_fn(x, t):
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = out.chunk(2)
        return combine(cond, uncond, cfg_scale, guided_channels or x.shape[1])

    return model_fn


def combine(cond, uncond, cfg_scale, guided_channels):
    """Guide the first `guided_channels` channels; the rest are the conditional output."""
    k = guided_channels
    return torch.cat([uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)
