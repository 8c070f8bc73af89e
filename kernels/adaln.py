"""LayerNorm + AdaLN modulation and the gated residual of DiT/SiT blocks.

ln_modulate:               y = LN(x; eps, optional weight/bias) * (1 + scale[b]) + shift[b]
gate_residual:             x + gate[b] * y
gate_residual_ln_modulate: (x1, LN(x1) modulated) with x1 = x + gate[b] * y: the residual of one branch fused
                           with the norm of the next, the pattern of an adaLN-Zero block.
Shapes: x, y [B, T, D]; shift, scale, gate [B, D]; weight, bias [D] or None (None: DiT's affine-free LN,
given: USP's restored LayerNorm).
"""
import torch.nn.functional as F


def ln_modulate_reference(x, shift, scale, weight=None, bias=None, eps=1e-6):
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def gate_residual_reference(x, gate, y):
    return x + gate.unsqueeze(1) * y


def gate_residual_ln_modulate_reference(x, gate, y, shift, scale, weight=None, bias=None, eps=1e-6):
    x1 = gate_residual_reference(x, gate, y)
    return x1, ln_modulate_reference(x1, shift, scale, weight, bias, eps)
