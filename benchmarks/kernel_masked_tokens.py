"""Kernels-suite cases of kernels/masked_tokens.py: the encoder's keep-gather and the decoder's unshuffle at the
pretraining shapes of ViT-XL, each also against MAE's torch.gather formulation."""
import torch

from usp_fast_benchmarks import roofline
from usp_fast_benchmarks.kernel_case import KernelCase, dtype_name
from usp_fast_kernels import masked_tokens

# pretrain ViT-XL: 14x14 patches, 49 kept; its 512-wide decoder with one cls prefix. The pos-embs are fp32 here.
KEEP_GATHER, KEEP_GATHER_TINY = dict(B=256, L=196, K=49, D=1152), dict(B=2, L=16, K=4, D=64)
UNSHUFFLE, UNSHUFFLE_TINY = dict(B=256, L=196, K=49, D=512, P=1), dict(B=2, L=16, K=4, D=32, P=1)


def moved(op, dtype, shape):
    """The minimum bytes of the fused op, forward and backward (benchmarks/roofline.py)."""
    t = roofline.traffic(op, "fused", dtype_name(dtype), pos_dtype="float32", **shape)
    return dict(bytes_fwd=t.bytes("fwd"), bytes_bwd=t.bytes("bwd"))


def cases(ctx, inp):
    return [keep_gather_case(ctx, inp), unshuffle_case(ctx, inp)]


def keep_gather_case(ctx, inp):
    """Encoder keep-gather, pretrain ViT-XL; the pos-emb is a fixed fp32 buffer, x gets the gradient."""
    shape = KEEP_GATHER_TINY if ctx.tiny else KEEP_GATHER
    B, L, K, D = (shape[k] for k in "BLKD")
    x, pos, ids = inp.randn(B, L, D, grad=True), inp.randn(L, D, dtype=torch.float32), inp.permutations(B, L)[:, :K]
    return KernelCase("keep_gather", shape, {
        "triton": lambda: masked_tokens.keep_gather_triton(x, ids, pos),
        "eager": lambda: masked_tokens.keep_gather_reference(x, ids, pos),
        # MAE: pos-emb added to every token, then torch.gather with the ids repeated over the width
        "mae_gather": lambda: torch.gather(x + pos.to(x.dtype), 1, ids.unsqueeze(-1).repeat(1, 1, D)),
    }, [x], **moved("keep_gather", inp.dtype, shape))


def unshuffle_case(ctx, inp):
    """Decoder unshuffle, pretrain ViT-XL decoder (width 512, one cls prefix); y and the mask token get grads."""
    shape = UNSHUFFLE_TINY if ctx.tiny else UNSHUFFLE
    B, L, K, D, P = (shape[k] for k in "BLKDP")
    y, mask_token = inp.randn(B, P + K, D, grad=True), inp.randn(D, grad=True)
    pos, ids_restore = inp.randn(P + L, D, dtype=torch.float32), torch.argsort(inp.permutations(B, L), dim=1)

    def mae_unshuffle():
        tokens = torch.cat([y[:, P:], mask_token.view(1, 1, D).expand(B, L - K, D)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).repeat(1, 1, D))
        return torch.cat([y[:, :P], tokens], dim=1) + pos.to(y.dtype)

    return KernelCase("unshuffle", shape, {
        "triton": lambda: masked_tokens.unshuffle_triton(y, mask_token, ids_restore, pos, P),
        "eager": lambda: masked_tokens.unshuffle_reference(y, mask_token, ids_restore, pos, P),
        "mae_gather": mae_unshuffle,
    }, [y, mask_token], **moved("unshuffle", inp.dtype, shape))
