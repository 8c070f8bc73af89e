"""Process-group set-up for `deepspeed` launches and plain `python` runs, on GPUs (NCCL) or CPUs (gloo)."""
import importlib
import logging
import os
import socket

import torch
import torch.distributed as td

log = logging.getLogger(__name__)


def env_rank():
    """This process's rank from the launcher's environment (0 for a plain `python` run), before any process group."""
    return int(os.environ.get("RANK", 0))


def setup_logging(rank, rdir=None):
    """INFO from rank 0 (WARNING from the others) to stdout, and from rank 0 to <rdir>/train.log too."""
    import sys
    from pathlib import Path

    level = logging.INFO if rank == 0 else logging.WARNING
    handlers = [logging.StreamHandler(sys.stdout)]
    if rdir is not None and rank == 0:
        Path(rdir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(rdir) / "train.log"))
    logging.basicConfig(level=level, format=f"%(asctime)s [r{rank}] %(name)s: %(message)s", handlers=handlers,
                        force=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(use_deepspeed=True):
    """Initialise the process group (a world of one for plain `python`). Returns (rank, world_size, device)."""
    if "WORLD_SIZE" not in os.environ:  # plain `python usp_fast/train.py`: a single-process world
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not td.is_initialized():
        if use_deepspeed:
            import deepspeed
            if device.type == "cpu":
                _skip_cpu_shm_build()
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        else:
            td.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return td.get_rank(), td.get_world_size(), device


def _skip_cpu_shm_build():
    # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (~40 s) when its comm backend is
    # created. Training on CPU uses gloo collectives and never calls it, so skip the build.
    # (importlib, because `import deepspeed.comm.torch as m` resolves to the real torch via a package attribute)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def barrier():
    if td.is_initialized() and td.get_world_size() > 1:
        td.barrier()


def mean_across_ranks(t):
    if td.is_initialized() and td.get_world_size() > 1:
        t = t.clone()
        td.all_reduce(t)
        t /= td.get_world_size()
    return t


def is_main():
    return not td.is_initialized() or td.get_rank() == 0
