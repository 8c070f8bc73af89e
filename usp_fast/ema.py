"""The fp32 EMA of a module's parameters (the generate stage's, checkpointed through state_dict)."""
import torch


class EMA:
    """fp32 exponential moving average of a module's parameters: shadow <- decay * shadow + (1 - decay) * param."""

    def __init__(self, model, decay):
        self.decay = float(decay)
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for _, p in model.named_parameters()]

    @torch.no_grad()
    def update(self, model):
        params = [p.detach() for _, p in model.named_parameters()]
        if self.shadow[0].device != params[0].device:  # first update after the engine moved the model
            self.shadow = [s.to(params[0].device) for s in self.shadow]
        if params[0].dtype == torch.float32:
            torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)
        else:  # bf16 weights: lerp needs equal dtypes; mul + add promote into the fp32 shadow
            torch._foreach_mul_(self.shadow, self.decay)
            torch._foreach_add_(self.shadow, params, alpha=1.0 - self.decay)

    def state_dict(self):
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state):
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]}{'...' if len(missing) > 5 else ''}")
        self.shadow = [state[n].detach().float().clone().to(s.device) for n, s in zip(self.names, self.shadow)]
