"""Kernels-suite cases of kernels/masked_tokens.py: the encoder's keep-gather and the decoder's unshuffle at the
pretraining shapes of ViT-XL, each also against MAE's torch.gather formulation."""
import torch

from usp_fast_benchmarks.kernel_case import KernelCase, nbytes
from usp_fast_kernels import masked_tokens


def cases(ctx, inp):
    return [keep_gather_case(ctx, inp), unshuffle_case(ctx, inp)]


def keep_gather_case(ctx, inp):
    """Encoder keep-gather, pretrain ViT-XL; the pos-emb is a fixed fp32 buffer, x gets the gradient."""
    B, L, K, D = (2, 16, 4, 64) if ctx.tiny else (256, 196, 49, 1152)
    x, pos, ids = inp.randn(B, L, D, grad=True), inp.randn(L, D, dtype=torch.float32), inp.permutations(B, L)[:, :K]
    visible = inp.meta(B, K, D)
    return KernelCase("keep_gather", dict(B=B, L=L, K=K, D=D), {
        "triton": lambda: masked_tokens.keep_gather_triton(x, ids, pos),
        "eager": lambda: masked_tokens.keep_gather_reference(x, ids, pos),
        # MAE: pos-emb added to every token, then torch.gather with the ids repeated over the width
        "mae_gather": lambda: torch.gather(x + pos.to(x.dtype), 1, ids.unsqueeze(-1).repeat(1, 1, D)),
    }, [x], bytes_fwd=2 * nbytes(visible) + nbytes(pos, ids), bytes_bwd=nbytes(visible, x, ids))


def unshuffle_case(ctx, inp):
    """Decoder unshuffle, pretrain ViT-XL decoder (width 512, one cls prefix); y and the mask token get grads."""
    B, L, K, D, P = (2, 16, 4, 32, 1) if ctx.tiny else (256, 196, 49, 512, 1)
    y, mask_token = inp.randn(B, P + K, D, grad=True), inp.randn(D, grad=True)
    pos, ids_restore = inp.randn(P + L, D, dtype=torch.float32), torch.argsort(inp.permutations(B, L), dim=1)

    def mae_unshuffle():
        tokens = torch.cat([y[:, P:], mask_token.view(1, 1, D).expand(B, L - K, D)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).repeat(1, 1, D))
        return torch.cat([y[:, :P], tokens], dim=1) + pos.to(y.dtype)

    full = inp.meta(B, P + L, D)
    return KernelCase("unshuffle", dict(B=B, L=L, K=K, D=D, num_prefix=P), {
        "triton": lambda: masked_tokens.unshuffle_triton(y, mask_token, ids_restore, pos, P),
        "eager": lambda: masked_tokens.unshuffle_reference(y, mask_token, ids_restore, pos, P),
        "mae_gather": mae_unshuffle,
    }, [y, mask_token], bytes_fwd=nbytes(y, full, pos, ids_restore), bytes_bwd=nbytes(full, y, ids_restore))
