"""Launch sizing and layout helpers shared by the Triton paths of the fused ops. Plain Python and torch: importing
this module does not import triton (the `@triton.jit` kernels live in the `_*_jit` modules, loaded on first launch)."""
import functools
import json
import os
from pathlib import Path

import torch

# Elements one program touches per loop step: big enough to keep loads in flight, small enough for registers.
TILE_ELEMENTS = 4096
# Programs per SM to aim for when a kernel splits work that then needs a cross-program reduction.
PROGRAMS_PER_SM = 4
# Programs to aim for under TRITON_INTERPRET=1, where each program instance costs Python time.
INTERPRETER_PROGRAMS = 8
# Measured launch configurations, (op, D, dtype, shape class) -> num_warps and programs per SM; written by
# benchmarks/tune_launch.py on a GPU and committed. Looked up, never tuned at run time: a fixed configuration
# keeps the chunking, hence the reduction order, hence the bitwise results, the same on every run.
# USP_FAST_LAUNCH_TABLE names another table (the GPU check's step cases read the one its tune stage just wrote).
LAUNCH_TABLE_FILE = Path(os.environ.get("USP_FAST_LAUNCH_TABLE") or Path(__file__).with_name("launch_table.json"))
# Heuristic defaults where the table has no entry: forward programs carry no reduction and spread wider.
DEFAULT_PROGRAMS_PER_SM = {"fwd": 16, "bwd": 4}


def cdiv(a, b):
    return -(-a // b)


def next_pow2(n):
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def col_block(width, max_block=256, min_block=64):
    """Power-of-two column block for ops that split a row across programs: the one that pads `width` least
    (the larger on ties), so e.g. 1152 gets 128 (no masked lanes) rather than 256 (10% masked)."""
    best = None
    block = max_block
    while block >= min_block:
        padded = cdiv(width, block) * block
        if best is None or padded < best[0]:
            best = (padded, block)
        block //= 2
    return min(best[1], next_pow2(width))


def split_row(width, min_tail=16):
    """A row of `width` columns as (main, tail) power-of-two blocks: main the largest power of two <= width, tail
    the smallest (>= min_tail) covering the rest: 1152 -> (1024, 128), 768 -> (512, 256), 1024 -> (1024, 16)
    (an all-masked tail). Padding 1152 to one 2048-wide block would leave 44% of the lanes masked."""
    main = 1 << (max(int(width), 1).bit_length() - 1)
    return main, max(next_pow2(width - main), min_tail)


def shape_class(rows):
    """The shape class a tuned entry holds for: rows (B x T, the tokens one launch covers) by power of two, since
    the best programs per SM follow how many rows each program gets. None for an entry tuned before classes."""
    return None if rows is None else max(int(rows), 1).bit_length() - 1


@functools.lru_cache(maxsize=None)
def _launch_table(path=LAUNCH_TABLE_FILE):
    if not Path(path).is_file():
        return {}
    data = json.loads(Path(path).read_text())
    return {(e["op"], int(e["D"]), e["dtype"], shape_class(e.get("rows"))): e for e in data.get("entries", [])}


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _table_entry(op, width, dtype, rows):
    """The entry of the call's shape class; else a class-free (older) entry; a caller that gives no rows gets the
    one entry of its (op, D, dtype) when there is exactly one, else none."""
    table = _launch_table()
    key = (op, int(width), DTYPE_NAMES.get(dtype, str(dtype)))
    if rows is not None and (entry := table.get((*key, shape_class(rows)))) is not None:
        return entry
    if (entry := table.get((*key, None))) is not None:
        return entry
    same = [e for k, e in table.items() if k[:3] == key]
    return same[0] if rows is None and len(same) == 1 else None


def launch_config(op, width, dtype, block_elems, rows=None):
    """-> {num_warps, programs_per_sm, source} for `op` ('<name>/fwd' or '/bwd') at row width `width` over `rows`
    rows (B x T): the committed table's measured entry for that shape class, else the heuristic (4 warps up to
    1024-wide blocks, 8 above)."""
    entry = _table_entry(op, width, dtype, rows)
    if entry is not None:
        return {"num_warps": int(entry["num_warps"]), "programs_per_sm": int(entry["programs_per_sm"]),
                "source": entry.get("measured_on", "table")}
    return {"num_warps": 8 if block_elems > 1024 else 4,
            "programs_per_sm": DEFAULT_PROGRAMS_PER_SM[op.rsplit("/", 1)[-1]], "source": "heuristic"}


def rows_per_tile(block_cols):
    return max(1, TILE_ELEMENTS // block_cols)


def num_warps_for(block_elems):
    return 8 if block_elems >= 2048 else 4


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device):
    """The device's SMs; on CPU (the interpreter) a count that gives about INTERPRETER_PROGRAMS programs."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, INTERPRETER_PROGRAMS // PROGRAMS_PER_SM)


def target_programs(device):
    """How many programs a reduction-carrying launch should have to fill the device."""
    return PROGRAMS_PER_SM * sm_count(device)


def unit_stride_rows(t):
    """`t` itself when its last dim is unit-stride (kernels take the other strides), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_same_device(name, *tensors):
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: inputs are on different devices {sorted(map(str, devices))}")
