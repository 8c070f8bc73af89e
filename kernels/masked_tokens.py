"""Masked-token ops of MAE-style pretraining.

keep_gather: pick the visible tokens of each row (optionally adding the pos-emb in the same pass).
unshuffle:   put the encoder's visible tokens back in image order, filling masked places with the mask token
             (optionally adding the decoder pos-emb), with `num_prefix` leading tokens (cls) passed through.

Index contract (set by the model's random masking):
  ids_keep    [B, K] int64, unique per row, values in [0, L): the visible patches, in shuffled order.
  ids_restore [B, L] int64, a permutation per row: patch l sits at shuffled position ids_restore[b, l];
              positions >= K are masked.
"""
import torch


def _check_index(name, ids, batch, upper):
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2 or ids.shape[0] != batch:
        raise ValueError(f"{name}: expected an int32/int64 tensor [B={batch}, N], got {tuple(ids.shape)} {ids.dtype}")


def keep_gather_reference(x, ids_keep, pos=None):
    """x [B, L, D], ids_keep [B, K], pos [L, D] or None -> x_vis [B, K, D] (= (x + pos)[b, ids_keep[b]])."""
    B, L, D = x.shape
    _check_index("keep_gather ids_keep", ids_keep, B, L)
    rows = torch.arange(B, device=x.device)[:, None]
    out = x[rows, ids_keep]
    if pos is not None:
        out = out + pos[ids_keep].to(out.dtype)
    return out


def unshuffle_reference(y, mask_token, ids_restore, pos=None, num_prefix=0):
    """y [B, P+K, D] (P = num_prefix leading tokens, passed through), mask_token [D],
    ids_restore [B, L], pos [P+L, D] or None -> [B, P+L, D]."""
    B, PK, D = y.shape
    L = ids_restore.shape[1]
    _check_index("unshuffle ids_restore", ids_restore, B, L)
    K = PK - num_prefix
    visible = y[:, num_prefix:]
    full = torch.cat([visible, mask_token.to(y.dtype).view(1, 1, D).expand(B, L - K, D)], dim=1)
    rows = torch.arange(B, device=y.device)[:, None]
    out = torch.cat([y[:, :num_prefix], full[rows, ids_restore]], dim=1)
    if pos is not None:
        out = out + pos.to(out.dtype)
    return out
