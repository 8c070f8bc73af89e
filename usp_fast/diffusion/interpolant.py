"""SiT's linear interpolant with velocity prediction (Ma et al. 2024; stochastic interpolants, Albergo et al.).

Convention here: t = 0 is data, t = 1 is noise.
    x_t = (1 - t) x0 + t eps,  t ~ U[0, 1)        velocity target  v = d x_t / dt = eps - x0
The model is conditioned on t itself (a float in [0, 1]). Loss: MSE between the model's first C output channels
and v (a SiT model built with learn_sigma has 2C outputs; the extra half is unused, as in SiT).

Sampling integrates from t = 1 (noise) to t = 0:
  ODE  dx/dt = v(x, t)                     Euler or Heun (2nd order) on a uniform grid of `steps` intervals.
  SDE  reverse-time SDE with the same marginals, diffusion w(t) = norm * t (SiT's default "sigma" form):
           dx = [v - w s] dt + sqrt(2 w) dW,   score s(x, t) = -(x + (1 - t) v) / t
       (from x = eps - (1 - t) v given x0 = eps - v, so E[eps | x_t] = x + (1 - t) v and s = -E[eps | x_t] / t),
       i.e. w s = -norm (x + (1 - t) v) with no division. Euler-Maruyama on a uniform grid from 1 down to
       `last_step_size`, then one last step to 0 taking the mean (no noise), as SiT's "Mean" last step.
"""
import torch

from .gaussian import mean_flat


class LinearInterpolant:
    @staticmethod
    def interpolate(x0, noise, t):
        t = t.view(-1, *([1] * (x0.ndim - 1)))
        return (1 - t) * x0 + t * noise

    @staticmethod
    def velocity_target(x0, noise):
        return noise - x0

    @staticmethod
    def score_from_velocity(v, x, t):
        t = t.view(-1, *([1] * (x.ndim - 1)))
        return -(x + (1 - t) * v) / t

    def training_loss(self, model, x0, y, generator):
        """t ~ U[0, 1), noise ~ N(0, I), both from `generator`. -> (loss, metrics)."""
        x0f = x0.float()
        t = torch.rand(x0.shape[0], device=x0.device, generator=generator)
        noise = torch.randn(x0f.shape, device=x0.device, generator=generator)
        x_t = self.interpolate(x0f, noise, t)
        out = model(x_t.to(x0.dtype), t, y).float()[:, : x0.shape[1]]  # t stays fp32: bf16 would round it
        return mean_flat((out - self.velocity_target(x0f, noise)) ** 2).mean(), {}

    @staticmethod
    def _velocity(model_fn, x, t):
        return model_fn(x, torch.full((x.shape[0],), t, device=x.device)).float()[:, : x.shape[1]]

    def ode_sample(self, model_fn, noise, steps=50, method="heun"):
        """model_fn(x, t [B]) -> velocity. Euler: `steps` evaluations; Heun: 2 per step."""
        if method not in ("euler", "heun"):
            raise ValueError(f"ODE method {method!r}: expected 'euler' or 'heun'")
        x = noise.float()
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        for t_cur, t_next in zip(grid[:-1], grid[1:]):
            h = t_cur - t_next
            v = self._velocity(model_fn, x, t_cur)
            x_euler = x - h * v
            if method == "euler":
                x = x_euler
            else:  # trapezoid between the slope here and at the Euler prediction
                x = x - 0.5 * h * (v + self._velocity(model_fn, x_euler, t_next))
        return x

    def sde_sample(self, model_fn, noise, steps=250, generator=None, last_step_size=0.04, diffusion_norm=1.0):
        """Euler-Maruyama with `steps` model evaluations; noise from `generator`."""
        if steps < 2 or not 0 < last_step_size < 1:
            raise ValueError("SDE sampling needs steps >= 2 and 0 < last_step_size < 1")
        x = noise.float()
        grid = torch.linspace(1.0, last_step_size, steps, dtype=torch.float64).tolist()

        def reverse_drift(x, t):  # v - w s
            v = self._velocity(model_fn, x, t)
            return v + diffusion_norm * (x + (1 - t) * v)

        for t_cur, t_next in zip(grid[:-1], grid[1:]):
            h = t_cur - t_next
            z = torch.randn(x.shape, device=x.device, generator=generator)
            x = x - h * reverse_drift(x, t_cur) + (2 * diffusion_norm * t_cur * h) ** 0.5 * z
        return x - grid[-1] * reverse_drift(x, grid[-1])

    def sample(self, model_fn, noise, method="ode-heun", steps=50, generator=None, last_step_size=0.04,
               diffusion_norm=1.0):
        """method: 'ode-euler', 'ode-heun' or 'sde' (Euler-Maruyama)."""
        if method in ("ode-euler", "ode-heun"):
            return self.ode_sample(model_fn, noise, steps, method[4:])
        if method == "sde":
            return self.sde_sample(model_fn, noise, steps, generator, last_step_size, diffusion_norm)
        raise ValueError(f"SiT sampler {method!r}: expected 'ode-euler', 'ode-heun' or 'sde'")
