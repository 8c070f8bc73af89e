"""Shared fixtures: a tiny real-architecture VAE saved as a local diffusers folder, a small ImageFolder of real
photo crops, and its latent cache. Everything runs on CPU in fp32."""
import os

# The suite is the CPU fp32 suite even on a GPU machine (its exact-resume tests compare bitwise): hide the GPUs
# unless USP_FAST_TEST_GPU=1 asks for the GPU paths. Set before torch first touches CUDA.
if os.environ.get("USP_FAST_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from usp_fast.stages import load_config  # noqa: E402

TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64, norm_num_groups=4,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16],
)
RESOLUTION = 64  # -> 8x8 latents, 4x4 patches of 2x2


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run with USP_FAST_TEST_GPU=1 pytest -m gpu)")


def one_line_exit_2(capsys, argv):
    """Run the command line; -> its one stderr line, after checking the exit status 2 and that no traceback ran."""
    from usp_fast.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and OpenMP spinning makes them many times slower when other
    processes share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    d = tmp_path_factory.mktemp("tiny_vae")
    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    from usp_fast.data.demo import make_demo_imagefolder

    root = tmp_path_factory.mktemp("images")
    make_demo_imagefolder(root, 40, seed=1, min_side=64)
    return root


def make_cfg(tmp_path, images, vae_dir, *overrides, stage="pretrain"):
    """A tiny config of `stage` over `images` with the tiny VAE; extra overrides as 'a.b=value'."""
    base = [
        f"run.out_dir={tmp_path / 'runs'}", "run.name=t", f"data.root={images}",
        f"data.cache_dir={tmp_path / 'cache'}", f"data.resolution={RESOLUTION}", "data.num_workers=0",
        f"vae.name={vae_dir}", "vae.encode_batch=8", "cache.shard_size=16", "model.name=usp_vit_test",
        "optim.lr=1e-3", "optim.warmup_epochs=1", "train.epochs=1000", "train.global_batch=8",
        "train.micro_batch=4", "train.log_every=1", "train.ckpt_every=1000", "train.zero_stage=0",
    ]
    return load_config(None, base + list(overrides), stage=stage)


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory, demo_images, tiny_vae_dir):
    """A finished cache over the demo images; tests copy it rather than modify it."""
    from usp_fast.data.cache import build_cache
    from usp_fast.vae import load_vae

    tmp = tmp_path_factory.mktemp("cache_run")
    cfg = make_cfg(tmp, demo_images, tiny_vae_dir)
    build_cache(cfg, load_vae(str(tiny_vae_dir)), torch.device("cpu"))
    return cfg


def gen_cfg(tmp_path, cache_cfg, *overrides):
    """A tiny generate config over the shared test cache (64 px -> 8x8 latents -> 4x4 tokens of DiT-Test/2)."""
    base = [
        f"run.out_dir={tmp_path / 'runs'}", "run.name=g", f"data.root={cache_cfg.data.root}",
        f"data.cache_dir={cache_cfg.data.cache_dir}", f"data.resolution={cache_cfg.data.resolution}",
        "data.num_workers=0", f"vae.name={cache_cfg.vae.name}", "model.name=DiT-Test/2", "optim.lr=2e-3",
        "optim.weight_decay=0.0", "optim.warmup_epochs=0", "optim.schedule=constant", "optim.betas=[0.9,0.999]",
        "train.epochs=1000", "train.global_batch=8", "train.micro_batch=4", "train.log_every=1",
        "train.ckpt_every=1000", "train.zero_stage=0", "ema.decay=0.9",
    ]
    return load_config(None, base + list(overrides), stage="generate")
