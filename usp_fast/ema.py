"""The fp32 EMA of a module's parameters (the generate stage's, checkpointed through state_dict)."""
import torch


class EMA:
    """fp32 exponential moving average of a module's parameters: shadow <- d * shadow + (1 - d) * param.

    d is `decay`, or with `warmup` timm ModelEmaV3's warm-up d_n = min(decay, 1 - (1 + n)^(-2/3)) at the n-th
    update (n from 0), so a short run's EMA follows the weights early instead of staying near the initial ones.
    The update count is derived from the optimizer step, so a resumed run uses the same decays."""

    WARMUP_POWER = 2 / 3  # timm's ModelEmaV3 default for short runs

    def __init__(self, model, decay, warmup=False):
        self.decay, self.warmup = float(decay), bool(warmup)
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for _, p in model.named_parameters()]

    def decay_at(self, step):
        """The decay of the update after optimizer step `step` (0-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + step) ** -self.WARMUP_POWER)

    @torch.no_grad()
    def update(self, model, step=None, params=None):
        """One update from `model`'s parameters, or from `params` (same order, e.g. the optimizer's fp32
        masters when the module holds bf16 weights: usp_fast.engine.master_params)."""
        decay = self.decay if step is None else self.decay_at(step)
        params = [p.detach() for _, p in model.named_parameters()] if params is None else list(params)
        if self.shadow[0].device != params[0].device:  # first update after the engine moved the model
            self.shadow = [s.to(params[0].device) for s in self.shadow]
        if params[0].dtype == torch.float32:
            torch._foreach_lerp_(self.shadow, params, 1.0 - decay)
        else:  # bf16 weights: lerp needs equal dtypes; mul + add promote into the fp32 shadow
            torch._foreach_mul_(self.shadow, decay)
            torch._foreach_add_(self.shadow, params, alpha=1.0 - decay)

    def state_dict(self):
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state):
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
        self.shadow = [state[n].detach().float().clone().to(s.device) for n, s in zip(self.names, self.shadow)]
