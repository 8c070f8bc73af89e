"""Process-group set-up on GPUs (NCCL) or CPUs (gloo) for every launcher: `deepspeed` and `torchrun` (RANK,
WORLD_SIZE, MASTER_ADDR set), SLURM `srun` (the world read from SLURM_PROCID / SLURM_STEP_NUM_TASKS /
SLURM_LOCALID, the master from the first host of the node list), OpenMPI `mpirun` (with MASTER_ADDR given), and
plain `python` (a world of one). Several processes started with no world information are refused: run as
separate one-rank jobs they would all write the same run folder."""
import importlib
import logging
import os
import re
import socket

import torch
import torch.distributed as td

from .errors import UserError

log = logging.getLogger(__name__)


class LaunchError(UserError, RuntimeError):
    pass


def env_rank():
    """This process's rank from the launcher's environment (0 for a plain `python` run), before any process group."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)


def env_world_size():
    """-> (the number of ranks the launcher's environment describes, the variable it came from or None), read
    before any process group: WORLD_SIZE (deepspeed, torchrun), else the tasks of an srun step, else
    OMPI_COMM_WORLD_SIZE (mpirun), else 1."""
    env = os.environ
    if env.get("WORLD_SIZE"):
        return int(env["WORLD_SIZE"]), "WORLD_SIZE"
    if _slurm_tasks(env) is not None:
        return _slurm_tasks(env), "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    if env.get("OMPI_COMM_WORLD_SIZE"):
        return int(env["OMPI_COMM_WORLD_SIZE"]), "OMPI_COMM_WORLD_SIZE"
    return 1, None


def _slurm_tasks(env=None):
    """Tasks of this srun step (set by srun; not in the batch script itself, which is one process even when the
    job has many tasks), or None outside a step."""
    env = os.environ if env is None else env
    if "SLURM_PROCID" not in env or not ("SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_ID" in env):
        return None
    return int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)


def first_host(nodelist):
    """The first host name of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07', 'a,b' -> 'a'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise LaunchError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = m.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def world_from_launcher(env=None):
    """The torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) this launcher's
    environment implies, to add to the environment; {} when they are set already."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:  # deepspeed, torchrun (also inside an srun step: their own world wins)
        return {}
    tasks = _slurm_tasks(env)
    if tasks is not None:  # srun
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if tasks > 1 and not (nodes or env.get("MASTER_ADDR")):
            raise LaunchError("srun with several tasks but no SLURM_JOB_NODELIST to find the master host: set "
                              "MASTER_ADDR")
        job = int(env.get("SLURM_JOB_ID", 0))
        return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(tasks),
                "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
                "MASTER_ADDR": env.get("MASTER_ADDR") or (first_host(nodes) if nodes else "127.0.0.1"),
                "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + job % 20000)}  # the same on every task
    mpi = int(env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE") or 1)
    if mpi > 1:
        if "MASTER_ADDR" not in env or "OMPI_COMM_WORLD_RANK" not in env:
            raise LaunchError(f"{mpi} MPI processes but no MASTER_ADDR (or no OMPI_COMM_WORLD_RANK): launch with "
                              "torchrun, deepspeed or srun, or export MASTER_ADDR and MASTER_PORT")
        return {"RANK": env["OMPI_COMM_WORLD_RANK"], "WORLD_SIZE": str(mpi),
                "LOCAL_RANK": env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"), "MASTER_ADDR": env["MASTER_ADDR"],
                "MASTER_PORT": env.get("MASTER_PORT", "29500")}
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port())}  # plain python: a world of one


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
    if not td.is_initialized():
        os.environ.update(world_from_launcher())
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


def broadcast_from_main(obj):
    """Rank 0's `obj` (any picklable value) on every rank."""
    if not (td.is_initialized() and td.get_world_size() > 1):
        return obj
    box = [obj]
    device = torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else None
    td.broadcast_object_list(box, src=0, device=device)
    return box[0]


def mean_across_ranks(t):
    if td.is_initialized() and td.get_world_size() > 1:
        t = t.clone()
        td.all_reduce(t)
        t /= td.get_world_size()
    return t


def is_main():
    return not td.is_initialized() or td.get_rank() == 0
