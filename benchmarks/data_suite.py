"""The `data` benchmark suite: decode + augment (RandomResizedCrop + flip) + VAE-encode throughput, DALI vs the
PIL loader with N worker threads, and the stall fraction of a pretrain step fed by the online stream.

Registered in benchmarks/run.py (`python benchmarks/run.py --suite data`); also runnable alone:
`python benchmarks/data_suite.py [--images DIR] [--vae DIR] [--n N]`. Uses ../shared's real ImageNet JPEGs and
TAEF2 weights when present, else demo photos and a small random AutoencoderKL (said so in the result). On CPU
the figures are CPU figures; GPU figures only come from a run on a GPU.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from usp_fast_benchmarks.env import REPO

SHARED = REPO / ".." / "shared"


def _images(n, override=None):
    from usp_fast.data.demo import make_demo_imagefolder
    from usp_fast.data.images import list_images

    root = Path(override) if override else SHARED / "data" / "imagenet-samples"
    if not root.is_dir():
        root = Path(tempfile.mkdtemp(prefix="usp_data_bench_"))
        make_demo_imagefolder(root, n, seed=0)
    items, _ = list_images(root)
    return str(root), items[:: max(1, len(items) // n)][:n]


def _vae(device, override=None):
    from usp_fast.vae import load_vae

    path = Path(override) if override else SHARED / "weights" / "taef2"
    if path.is_dir():
        return str(path), load_vae(str(path), scale=1.0, device=device)
    from diffusers import AutoencoderKL

    d = Path(tempfile.mkdtemp(prefix="usp_bench_vae_"))
    torch.manual_seed(0)
    AutoencoderKL(latent_channels=4, layers_per_block=1, norm_num_groups=8, block_out_channels=[32, 32, 64, 64],
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4).save_pretrained(d)
    return "small random AutoencoderKL (no ../shared)", load_vae(str(d), device=device)


def _decoders(device, batch, workers):
    from usp_fast.data.pipeline import PILDecoder, dali_available, make_decoder

    out = {f"pil-{w}w": PILDecoder(device, w) for w in workers}
    if dali_available():
        kind = "mixed" if device.type == "cuda" else "cpu"
        out[f"dali-{kind}-{max(workers)}t"] = make_decoder("dali", device, batch, max(workers))
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _throughput(decoder, items, batch, size, vae=None, device=None):
    """img/s of decode + RandomResizedCrop + flip (+ encode), after one warm-up batch."""
    from usp_fast.data.images import draw_view

    def run(lo, hi):
        paths = [p for p, _ in items[lo:hi]]
        makers = [(lambda i: lambda w, h: draw_view(0, 0, i, w, h, size, "rrc", flip=bool(i % 2)))(i)
                  for i in range(lo, hi)]
        x, ok, _ = decoder.decode(paths, makers)
        if vae is not None:
            vae.encode(x)
        return sum(ok)

    run(0, batch)
    _sync(device)
    start, done = time.perf_counter(), 0
    for lo in range(0, len(items), batch):
        done += run(lo, min(lo + batch, len(items)))
    _sync(device)
    return done / (time.perf_counter() - start)


def _stall(root, vae_name, decoder_kind, workers, device, size, micro, steps):
    """Fraction of wall time a tiny pretrain step waits for the online stream (decode + encode prefetched)."""
    from usp_fast.stages import load_config
    from usp_fast.data.online import OnlineSource
    from usp_fast.data.stream import StreamPlan
    from usp_fast.stages.pretrain import PretrainStage
    from usp_fast.vae import load_vae

    cfg = load_config(None, [f"data.root={root}", "data.source=online", f"data.decoder={decoder_kind}",
                             f"data.num_workers={workers}", f"data.resolution={size}", "model.name=usp_vit_tiny",
                             f"train.micro_batch={micro}", f"train.global_batch={micro}", "vae.scale=1.0",
                             f"vae.name={vae_name}"])
    src = OnlineSource(cfg, load_vae(vae_name, 1.0, device=device), device)
    task = PretrainStage(cfg)
    model = task.build_model(src.manifest, task.latent_norm(src.manifest)).to(device)  # as the Trainer does
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device)
    it = iter(src.stream(StreamPlan(len(src), 0, micro, micro, 1, 0), 0, steps + 1))
    next(it)  # warm-up: threads, pipelines, first encode
    wait = 0.0
    start = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        if "ready" in batch:
            torch.cuda.current_stream(device).wait_event(batch["ready"])
        _sync(device)
        wait += time.perf_counter() - t0
        gen.manual_seed(step)
        loss, _ = task.loss(model, {"latents": batch["mean"].float()}, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
    total = time.perf_counter() - start
    return {"step_ms": 1e3 * total / steps, "stall_fraction": wait / total}


def data_suite(ctx, images=None, vae_dir=None, n=None):
    device = ctx.device
    gpu = device.type == "cuda"
    n = n or (64 if ctx.tiny else 512)
    size, batch = (128, 16) if ctx.tiny else (224, 64)
    workers = [1, 2] if not gpu else [2, 8]
    root, items = _images(n, images)
    vae_name, vae = _vae(device, vae_dir)
    decoders = _decoders(device, batch, workers)
    result = {"device": str(device), "images": root, "num_images": len(items), "resolution": size,
              "batch": batch, "vae": vae_name, "decode_augment_img_s": {}, "decode_augment_encode_img_s": {},
              "pretrain_feed": {}}
    for name, dec in decoders.items():
        result["decode_augment_img_s"][name] = _throughput(dec, items, batch, size, device=device)
    enc_items = items[: max(batch * 2, len(items) // 4)]  # encoding dominates on CPU: fewer images
    for name, dec in decoders.items():
        result["decode_augment_encode_img_s"][name] = _throughput(dec, enc_items, batch, size, vae, device)
    vae_path = str(vae_dir or SHARED / "weights" / "taef2")
    if Path(vae_path).is_dir():
        for name in decoders:
            kind = "dali" if name.startswith("dali") else "pil"
            w = max(workers) if kind == "dali" else int(name.split("-")[1][:-1])
            result["pretrain_feed"][name] = _stall(root, vae_path, kind, w, device, size, batch // 2,
                                                   4 if ctx.tiny else 50)
    return result


def print_data(result, ctx=None):
    print(f"images: {result['images']} ({result['num_images']}), {result['resolution']} px RandomResizedCrop + "
          f"flip, batch {result['batch']}, VAE: {result['vae']}, device {result['device']}")
    print(f"{'loader':<18}{'decode+aug img/s':>18}{'+encode img/s':>16}{'pretrain step ms':>18}{'stall':>8}")
    for name, v in result["decode_augment_img_s"].items():
        feed = result["pretrain_feed"].get(name, {})
        print(f"{name:<18}{v:>18.1f}{result['decode_augment_encode_img_s'][name]:>16.2f}"
              f"{feed.get('step_ms', float('nan')):>18.0f}{feed.get('stall_fraction', float('nan')):>8.2f}")


def main(argv=None):
    from dataclasses import dataclass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="an ImageFolder (default: ../shared/data/imagenet-samples)")
    p.add_argument("--vae", help="VAE folder (default: ../shared/weights/taef2)")
    p.add_argument("--n", type=int, help="images to time")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)

    @dataclass
    class Ctx:
        device: torch.device
        tiny: bool

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = data_suite(Ctx(device, device.type != "cuda"), args.images, args.vae, args.n)
    print_data(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
