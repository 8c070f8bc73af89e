"""What one kernels-suite case is (an op at one shape, its implementations over shared inputs) and the seeded inputs
the cases draw from. The cases themselves are in kernel_<op>.py, beside kernels/<op>.py and
tests/kernels/test_<op>.py; kernel_suite.py measures them."""
from dataclasses import dataclass

import torch


@dataclass
class KernelCase:
    """One op at one shape: zero-argument implementations over shared inputs, the leaves that get gradients,
    and the minimum bytes each direction must move (benchmarks/roofline.py; for achieved bandwidth). `impls`
    holds at least 'triton' and 'eager' (the reference every error is measured against)."""
    op: str
    shape: dict
    impls: dict
    leaves: list
    bytes_fwd: int
    bytes_bwd: int


def dtype_name(dtype):
    """torch.bfloat16 -> 'bfloat16', as benchmarks/roofline.py names dtypes."""
    return str(dtype).replace("torch.", "")


class Inputs:
    """Seeded random tensors on the run's device (one generator for every case, drawn in the suite's order)."""

    def __init__(self, ctx, dtype):
        self.device, self.dtype = ctx.device, dtype
        self.gen = torch.Generator(device=ctx.device)
        self.gen.manual_seed(0)

    def randn(self, *shape, dtype=None, grad=False):
        t = torch.randn(*shape, generator=self.gen, device=self.device).to(dtype or self.dtype)
        return t.requires_grad_(grad)

    def permutations(self, B, L):
        """Per-row random permutations, as the model masks: argsort of uniform noise."""
        return torch.argsort(torch.rand(B, L, generator=self.gen, device=self.device), dim=1)
