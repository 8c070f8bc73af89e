"""The frozen VAE: images in [-1, 1] <-> scaled latents.

`load_vae(name, scale)` accepts
  - a local diffusers AutoencoderKL directory (config.json + weights),
  - a hub id, loaded only from the local cache (no downloads at run time): a missing one raises an error that
    says how to pass a local path,
  - 'random-sd': the SD-VAE architecture with random weights, for smoke runs (logged loudly as untrained).
Latents are returned scaled: scale * z, so the posterior std is scale * std as well.
"""
import hashlib
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# SD-VAE (kl-f8): 4 latent channels at 1/8 resolution.
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], norm_num_groups=32, act_fn="silu",
)


class VAEError(RuntimeError):
    pass


class LatentVAE(torch.nn.Module):
    """Frozen AutoencoderKL with the latent scale applied; `identity` goes into cache manifests."""

    def __init__(self, module, scale, identity):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.scale = float(scale)
        self.identity = identity
        cfg = module.config
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images):
        """images [B, 3, H, W] in [-1, 1] -> (mean, std), each [B, C, H/8, W/8], scaled."""
        dist = self.module.encode(images.to(self.module.dtype)).latent_dist
        return dist.mean * self.scale, dist.std * self.scale

    @torch.no_grad()
    def decode(self, latents):
        """scaled latents -> images [B, 3, H, W] in [-1, 1] (not clamped)."""
        return self.module.decode(latents.to(self.module.dtype) / self.scale).sample


def _fingerprint(module):
    """A short hash of the weights, so a cache records exactly which VAE made it."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


def load_vae(name, scale=0.18215, device="cpu", dtype=torch.float32, seed=0):
    from diffusers import AutoencoderKL

    if name == "random-sd":
        log.warning("!" * 78)
        log.warning("vae: random-sd -- the SD-VAE architecture with RANDOM, UNTRAINED weights. Latents carry image "
                    "structure but no learned semantics: use it for smoke runs only, never for results.")
        log.warning("!" * 78)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = AutoencoderKL(**SD_VAE_CONFIG)
        kind = "random-sd"
    elif Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise VAEError(f"vae '{name}' is a directory without config.json: expected a diffusers AutoencoderKL "
                           "folder (as written by AutoencoderKL.save_pretrained)")
        module = AutoencoderKL.from_pretrained(name)
        kind = "local"
    else:
        try:
            module = AutoencoderKL.from_pretrained(name, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - diffusers raises several types for a missing cache entry
            raise VAEError(
                f"vae '{name}' is neither a local directory nor in the local model cache, and this run does not "
                f"download weights. Download it once elsewhere (AutoencoderKL.from_pretrained('{name}')"
                ".save_pretrained(DIR)), copy DIR here and pass vae.name=DIR, or use vae.name=random-sd for a "
                f"smoke run. ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        kind = "hub-cache"
    module = module.to(device=device, dtype=dtype)
    identity = {"name": str(name), "kind": kind, "scale": float(scale), "fingerprint": _fingerprint(module),
                "latent_channels": int(module.config.latent_channels),
                "config": json.loads(json.dumps(dict(module.config), default=str))["block_out_channels"]}
    return LatentVAE(module, scale, identity)
