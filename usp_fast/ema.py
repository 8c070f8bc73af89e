"""The fp32 EMA of a module's parameters, or of any list of fp32 tensors (the generate stage averages the fp32
master partition each rank holds: usp_fast.engine.MasterWeights)."""
import torch


class EMA:
    """fp32 exponential moving average: shadow <- d * shadow + (1 - d) * value, over `source`: an nn.Module (its
    parameters, named, so state_dict works) or a list of tensors (in the same order at every update).

    d is `decay`, or with `warmup` timm ModelEmaV3's warm-up d_n = min(decay, 1 - (1 + n)^(-2/3)) at the n-th
    update (n from 0), so a short run's EMA follows the weights early instead of staying near the initial ones.
    The update count is derived from the optimizer step, so a resumed run uses the same decays."""

    WARMUP_POWER = 2 / 3  # timm's ModelEmaV3 default for short runs

    def __init__(self, source, decay, warmup=False):
        self.decay, self.warmup = float(decay), bool(warmup)
        named = isinstance(source, torch.nn.Module)
        self.names = [n for n, _ in source.named_parameters()] if named else None
        self.shadow = [t.detach().float().clone() for t in _values(source)]

    def decay_at(self, step):
        """The decay of the update after optimizer step `step` (0-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + step) ** -self.WARMUP_POWER)

    @torch.no_grad()
    def update(self, source, step=None):
        """One update from `source` (the module, or the tensors, given at construction), one fused foreach op."""
        decay = self.decay if step is None else self.decay_at(step)
        values = _values(source)
        if self.shadow[0].device != values[0].device:  # first update after the engine moved the model
            self.shadow = [s.to(values[0].device) for s in self.shadow]
        if values[0].dtype == torch.float32:
            torch._foreach_lerp_(self.shadow, values, 1.0 - decay)
        else:  # bf16 weights: lerp needs equal dtypes; mul + add promote into the fp32 shadow
            torch._foreach_mul_(self.shadow, decay)
            torch._foreach_add_(self.shadow, values, alpha=1.0 - decay)

    def state_dict(self):
        """{parameter name: shadow} (a module's EMA)."""
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state):
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
        self.shadow = [state[n].detach().float().clone().to(s.device) for n, s in zip(self.names, self.shadow)]


def _values(source):
    if isinstance(source, torch.nn.Module):
        return [p.detach() for p in source.parameters()]
    return list(source)
