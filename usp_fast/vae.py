"""The frozen VAE: images in [-1, 1] <-> scaled latents.

`load_vae(name, scale)` accepts
  - a local diffusers AutoencoderKL directory (config.json + weights), any config: SD (4 channels, /8),
    16 channels at /16, ... (channels and downsampling are read from the config),
  - a TAESD-family directory: `<x>_encoder.pth` + `<x>_decoder.pth` state dicts in the upstream taesd.py
    layout (e.g. taef2: 32 channels, /8, latent scale 1; use vae.scale=1). Deterministic: std is 0.
  - a hub id, loaded only from the local cache (no downloads at run time): a missing one raises an error that
    says how to pass a local path,
  - 'random-sd': the SD-VAE architecture with random weights, for smoke runs (logged loudly as untrained),
  - 'pixels' / 'pixels:F': NOT a learned VAE: space-to-depth of the image into FxF blocks (F=8 by default:
    3 x 8 x 8 = 192 channels at 1/8 resolution) and depth-to-space back, exactly invertible and weight-free.
    Demos and tests use it so that restorations and samples show real image content without downloaded weights.
    A generator can only denoise what its patch embedding keeps: keep patch^2 * 3F^2 <= the model width
    (the demo: pixels:4, patch 2 -> 192 = DiT-Tiny's width).
Latents are returned scaled: scale * z, so the posterior std is scale * std as well.
"""
import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

log = logging.getLogger(__name__)

# SD-VAE (kl-f8): 4 latent channels at 1/8 resolution.
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], norm_num_groups=32, act_fn="silu",
)


class VAEError(UserError, RuntimeError):
    """A vae.name that cannot be loaded (missing folder, unknown kind, weights that do not fit): one line."""


class LatentVAE(torch.nn.Module):
    """Frozen AutoencoderKL or TinyAutoencoder with the latent scale applied; `identity` goes into manifests."""

    def __init__(self, module, scale, identity):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.scale = float(scale)
        self.identity = identity
        self.tiny = isinstance(module, (TinyAutoencoder, PixelSpace))  # deterministic, images in [0, 1]
        # (low, high) of the scaled latents when the autoencoder bounds them (pixels: [-1, 1]), else None
        self.value_range = (-self.scale, self.scale) if isinstance(module, PixelSpace) else None
        if self.tiny:
            self.latent_channels, self.downsample = module.latent_channels, module.downsample
        else:
            cfg = module.config
            self.latent_channels = int(cfg.latent_channels)
            self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @property
    def dtype(self):
        return next(self.module.parameters(), torch.empty(0)).dtype  # (PixelSpace has no parameters)

    @torch.no_grad()
    def encode(self, images):
        """images [B, 3, H, W] in [-1, 1] -> (mean, std), each [B, C, H/d, W/d], scaled."""
        images = images.to(self.dtype)
        if self.tiny:  # TAESD takes [0, 1] and is deterministic; channels-last convs run ~1.25x faster on CPU
            x = (images * 0.5 + 0.5).contiguous(memory_format=torch.channels_last)
            mean = self.module.encoder(x).contiguous() * self.scale
            return mean, torch.zeros_like(mean)
        dist = self.module.encode(images).latent_dist
        return dist.mean * self.scale, dist.std * self.scale

    @torch.no_grad()
    def decode(self, latents):
        """scaled latents -> images [B, 3, H, W] in [-1, 1] (not clamped)."""
        latents = latents.to(self.dtype) / self.scale
        if self.tiny:
            return self.module.decoder(latents.contiguous(memory_format=torch.channels_last)).contiguous() * 2 - 1
        return self.module.decode(latents).sample


# ---- TAESD family: modules whose state-dict keys are exactly those of the upstream taesd.py ----
def _conv(n_in, n_out, **kw):
    return torch.nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class _Clamp(torch.nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class _Block(torch.nn.Module):
    """conv-relu-conv-relu-conv + skip, then ReLU; `gn` adds the mid-block 1x1 GroupNorm MLP (taef2)."""

    def __init__(self, n_in, n_out, gn=False):
        super().__init__()
        self.conv = torch.nn.Sequential(_conv(n_in, n_out), torch.nn.ReLU(), _conv(n_out, n_out), torch.nn.ReLU(),
                                        _conv(n_out, n_out))
        self.skip = torch.nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else torch.nn.Identity()
        self.fuse = torch.nn.ReLU()
        self.pool = torch.nn.Sequential(
            torch.nn.Conv2d(n_in, 4 * n_in, 1, bias=False), torch.nn.GroupNorm(4, 4 * n_in), torch.nn.ReLU(),
            torch.nn.Conv2d(4 * n_in, n_in, 1, bias=False)) if gn else None

    def forward(self, x):
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def taesd_encoder(latent_channels, gn=False):
    return torch.nn.Sequential(
        _conv(3, 64), _Block(64, 64),
        _conv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64),
        _conv(64, 64, stride=2, bias=False), _Block(64, 64), _Block(64, 64), _Block(64, 64),
        _conv(64, 64, stride=2, bias=False), *[_Block(64, 64, gn) for _ in range(3)],
        _conv(64, latent_channels))


def taesd_decoder(latent_channels, gn=False):
    def up():  # fresh modules each time: a shared conv would silently tie three layers' weights
        return [torch.nn.Upsample(scale_factor=2), _conv(64, 64, bias=False)]

    return torch.nn.Sequential(
        _Clamp(), _conv(latent_channels, 64), torch.nn.ReLU(),
        *[_Block(64, 64, gn) for _ in range(3)], *up(),
        _Block(64, 64), _Block(64, 64), _Block(64, 64), *up(),
        _Block(64, 64), _Block(64, 64), _Block(64, 64), *up(),
        _Block(64, 64), _conv(64, 3))


class TinyAutoencoder(torch.nn.Module):
    """TAESD: images in [0, 1] <-> deterministic latents at 1/8 resolution."""
    downsample = 8

    def __init__(self, encoder_sd, decoder_sd, where):
        super().__init__()
        try:
            self.latent_channels = int(encoder_sd["14.weight"].shape[0])
            gn = any(".pool." in k for k in encoder_sd)
            self.encoder, self.decoder = taesd_encoder(self.latent_channels, gn), taesd_decoder(self.latent_channels, gn)
            self.encoder.load_state_dict(encoder_sd)  # strict: the key map is the identity, or this fails
            self.decoder.load_state_dict(decoder_sd)
        except (KeyError, RuntimeError) as e:
            raise VAEError(f"{where}: not TAESD state dicts in the upstream taesd.py layout "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e


class PixelSpace(torch.nn.Module):
    """vae.name=pixels[:F]: images in [0, 1] <-> [-1, 1] pixel values rearranged into F x F blocks (3F^2 channels
    at 1/F resolution). Not a learned VAE: no compression, no semantics, exactly invertible, no weights."""

    def __init__(self, downsample=8):
        super().__init__()
        self.downsample = downsample
        self.latent_channels = 3 * downsample * downsample
        self.encoder = _Lambda(lambda x: torch.nn.functional.pixel_unshuffle(x * 2 - 1, self.downsample))
        self.decoder = _Lambda(lambda z: (torch.nn.functional.pixel_shuffle(z, self.downsample) + 1) / 2)


def _pixels_factor(name):
    """'pixels' -> 8, 'pixels:F' -> F (1-16), anything else -> None."""
    if name == "pixels":
        return 8
    m = re.fullmatch(r"pixels:(\d+)", str(name))
    if m is None:
        return None
    f = int(m.group(1))
    if not 1 <= f <= 16:
        raise VAEError(f"vae.name {name!r}: the space-to-depth factor must be 1-16")
    return f


class _Lambda(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _taesd_files(path):
    enc = sorted(Path(path).glob("*encoder.pth"))
    dec = sorted(Path(path).glob("*decoder.pth"))
    return (enc[0], dec[0]) if len(enc) == 1 and len(dec) == 1 else None


def _fingerprint(module):
    """A short hash of the weights, so a cache records exactly which VAE made it."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


def _first_line(e, limit=200):
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(e).__name__


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
    elif (factor := _pixels_factor(name)) is not None:
        log.warning(f"vae: {name} -- NOT a learned VAE: space-to-depth {factor}x{factor} blocks "
                    f"({3 * factor * factor} channels), exactly invertible. For demos and tests; use a real VAE "
                    "for results.")
        module = PixelSpace(factor)
        kind = "pixels"
    elif Path(name).is_dir() and _taesd_files(name):
        enc, dec = _taesd_files(name)

        def load(p):
            try:
                return torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - truncated or foreign: pickle, zip and runtime errors
                raise VAEError(f"vae.name={name}: {p} cannot be read as a TAESD state dict "
                               f"({type(e).__name__}: {_first_line(e)}); copy the weights again") from None

        module = TinyAutoencoder(load(enc), load(dec), name)
        kind = "taesd"
    elif Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise VAEError(f"vae '{name}' is a directory without config.json: expected a diffusers AutoencoderKL "
                           "folder (as written by AutoencoderKL.save_pretrained) or TAESD weights "
                           "(<x>_encoder.pth and <x>_decoder.pth)")
        try:
            module = AutoencoderKL.from_pretrained(name, low_cpu_mem_usage=False)
        except Exception as e:  # noqa: BLE001 - missing or truncated weights: OSError, safetensors and json errors
            raise VAEError(f"vae.name={name}: not a loadable diffusers AutoencoderKL folder "
                           f"({type(e).__name__}: {_first_line(e)}); it needs config.json and "
                           "diffusion_pytorch_model.safetensors (or .bin) in full: copy or download it again") from None
        kind = "local"
    elif Path(name).is_absolute() or str(name).startswith((".", "~")) or str(name).count("/") > 1:  # not a hub id
        raise VAEError(f"vae.name={name}: no such folder; expected a diffusers AutoencoderKL folder, a TAESD weights "
                       "folder, a hub id (org/name) in the local cache, pixels[:F] or random-sd")
    else:
        try:
            module = AutoencoderKL.from_pretrained(name, local_files_only=True, low_cpu_mem_usage=False)
        except Exception as e:  # noqa: BLE001 - diffusers raises several types for a missing cache entry
            raise VAEError(
                f"vae.name={name} is neither a local folder nor in the local Hugging Face cache, and runs never "
                f"download weights: on a machine with network run `hf download {name} --local-dir DIR` (older "
                f"huggingface_hub: `huggingface-cli download {name} --local-dir DIR`, or AutoencoderKL"
                f".from_pretrained('{name}').save_pretrained(DIR)), copy DIR here and set vae.name=DIR (or "
                f"vae.name=random-sd for a smoke run) ({type(e).__name__}: {_first_line(e)})") from None
        kind = "hub-cache"
    module = module.to(device) if dtype == torch.float32 else module.to(device=device, dtype=dtype)
    if kind == "taesd":
        module = module.to(memory_format=torch.channels_last)
    vae = LatentVAE(module, scale, {})
    vae.identity = {"name": str(name), "kind": kind, "scale": float(scale), "fingerprint": _fingerprint(module),
                    "latent_channels": vae.latent_channels, "downsample": vae.downsample,
                    "config": f"space-to-depth {vae.downsample}" if kind == "pixels" else [64] * 4 if vae.tiny else
                    json.loads(json.dumps(dict(module.config), default=str))["block_out_channels"]}
    return vae


class LatentNorm:
    """The latent normalisation a run trains in (`vae.normalize`), applied after `vae.scale` and undone before
    decoding: `none` (only the scale), `scalar` (one mean and std over all channels) or `channel` (per-channel
    mean and std), with the statistics the latent cache's manifest records. Every export records it."""

    MODES = ("none", "scalar", "channel")

    def __init__(self, mode="none", mean=None, std=None):
        if mode not in self.MODES:
            raise ValueError(f"vae.normalize {mode!r}: expected one of {', '.join(self.MODES)}")
        self.mode = mode
        self.mean = None if mode == "none" else torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = None if mode == "none" else torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)

    @classmethod
    def from_manifest(cls, mode, manifest, sample_posterior=False):
        """The statistics of the latents a run trains on: the manifest's, taken over every stored view; with
        posterior sampling the trained latents are mean + std * eps, whose variance adds the mean posterior
        variance."""
        if mode == "none":
            return cls()
        mean, std = manifest.get("latent_mean"), manifest.get("latent_std")
        if mean is None or std is None:
            from .errors import DataError
            raise DataError(f"vae.normalize={mode} needs the per-channel latent statistics of a latent cache "
                            "manifest; this data source has none (use vae.normalize=none with data.source=online)")
        mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        if sample_posterior:
            std = np.sqrt(std ** 2 + np.asarray(manifest.get("latent_posterior_var", np.zeros_like(std)), np.float64))
        if mode == "scalar":  # pooled over channels: the mean of means, and the std of the pooled distribution
            m = mean.mean()
            mean, std = np.array([m]), np.array([np.sqrt(np.mean(std ** 2 + (mean - m) ** 2))])
        return cls(mode, mean.tolist(), np.maximum(std, 1e-6).tolist())

    @classmethod
    def from_dict(cls, d):
        return cls() if not d else cls(d["mode"], d.get("mean"), d.get("std"))

    @classmethod
    def of(cls, meta):
        """The normalisation an export or generator records in its meta ('latent_norm'; none when absent)."""
        return cls.from_dict((meta or {}).get("latent_norm"))

    FILE = "latent_norm.json"  # <run>/latent_norm.json: the run's normalisation, written once by the engine

    @classmethod
    def of_run(cls, run_dir):
        path = Path(run_dir) / cls.FILE
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else cls()

    def as_dict(self):
        if self.mode == "none":
            return {"mode": "none"}
        return {"mode": self.mode, "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def normalize(self, z):
        if self.mode == "none":
            return z
        return (z - self.mean.to(z.device, z.dtype)) / self.std.to(z.device, z.dtype)

    def denormalize(self, z):
        if self.mode == "none":
            return z
        return z * self.std.to(z.device, z.dtype) + self.mean.to(z.device, z.dtype)
