"""Launch sizing and layout helpers shared by the Triton paths of the fused ops. Plain Python and torch: importing
this module does not import triton (the `@triton.jit` kernels live in the `_*_jit` modules, loaded on first launch)."""
import functools

import torch

# Elements one program touches per loop step: big enough to keep loads in flight, small enough for registers.
TILE_ELEMENTS = 4096
# Programs per SM to aim for when a kernel splits work that then needs a cross-program reduction.
PROGRAMS_PER_SM = 4
# Programs to aim for under TRITON_INTERPRET=1, where each program instance costs Python time.
INTERPRETER_PROGRAMS = 8


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


def rows_per_tile(block_cols):
    return max(1, TILE_ELEMENTS // block_cols)


def num_warps_for(block_elems):
    return 8 if block_elems >= 2048 else 4


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device):
    """How many programs a reduction-carrying launch should have to fill the device."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_PROGRAMS


def unit_stride_rows(t):
    """`t` itself when its last dim is unit-stride (kernels take the other strides), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_same_device(name, *tensors):
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: inputs are on different devices {sorted(map(str, devices))}")
