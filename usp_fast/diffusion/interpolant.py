"""SiT's linear interpolant with velocity prediction (Ma et al. 2024; stochastic interpolants, Albergo et al.).

Time convention as the official SiT code (transport/), so checkpoints and step counts are interchangeable with it:
t = 0 is noise, t = 1 is data.
    x_t = t x1 + (1 - t) eps,  t ~ U[0, 1)        velocity target  v = d x_t / dt = x1 - eps
The model is conditioned on t itself (a float in [0, 1]). Loss: MSE between the model's first C output channels
and v (a SiT model built with learn_sigma has 2C outputs; the extra half is unused, as in SiT).

Sampling integrates from t = 0 (noise) to t = 1 on SiT's grid linspace(t0, t1, steps): `steps` is the official
`num_steps`, a number of grid points, so a fixed-step solver takes steps - 1 steps.
  ODE  dx/dt = v(x, t)       euler, heun (torchdiffeq's heun2: trapezoid) on the grid, or dopri5 (adaptive
                             Dormand-Prince through torchdiffeq, SiT's default, atol 1e-6 / rtol 1e-3)
  SDE  the SDE with the same marginals, diffusion w(t) = norm * (1 - t) (SiT's default "sigma" form):
           dx = [v + w s] dt + sqrt(2 w) dW,   score s(x, t) = -(x - t v) / (1 - t)
       (eps = x - t v given x1 = x + (1 - t) v, and s = -E[eps | x_t] / (1 - t)), i.e. w s = -norm (x - t v)
       with no division. Euler-Maruyama on linspace(0, 1 - last_step_size, steps) (steps - 1 noisy steps),
       then one last step of size last_step_size taking the mean (no noise), SiT's "Mean" last step: `steps`
       model evaluations in all.
"""
import torch

from .gaussian import mean_flat

ODE_METHODS = {"ode-euler": "euler", "ode-heun": "heun2", "ode-dopri5": "dopri5"}  # ours -> torchdiffeq's name


class LinearInterpolant:
    @staticmethod
    def interpolate(x1, noise, t):
        t = t.view(-1, *([1] * (x1.ndim - 1)))
        return t * x1 + (1 - t) * noise

    @staticmethod
    def velocity_target(x1, noise):
        return x1 - noise

    @staticmethod
    def data_from_velocity(v, x, t):
        """x1 = x_t + (1 - t) v: the model's one-step estimate of the data."""
        t = t.view(-1, *([1] * (x.ndim - 1)))
        return x + (1 - t) * v

    @staticmethod
    def score_from_velocity(v, x, t):
        t = t.view(-1, *([1] * (x.ndim - 1)))
        return -(x - t * v) / (1 - t)

    @staticmethod
    def time_at_noise_level(level):
        """Fraction of the way from data (0) to noise (1) -> SiT time (t = 1 is data)."""
        return 1.0 - float(level)

    def training_loss(self, model, x1, y, generator):
        """t ~ U[0, 1), noise ~ N(0, I), both from `generator`. -> (loss, metrics)."""
        x1f = x1.float()
        t = torch.rand(x1.shape[0], device=x1.device, generator=generator)
        noise = torch.randn(x1f.shape, device=x1.device, generator=generator)
        x_t = self.interpolate(x1f, noise, t)
        out = model(x_t.to(x1.dtype), t, y).float()[:, : x1.shape[1]]  # t stays fp32: bf16 would round it
        return mean_flat((out - self.velocity_target(x1f, noise)) ** 2).mean(), {}

    @staticmethod
    def _velocity(model_fn, x, t):
        t = torch.full((x.shape[0],), float(t), device=x.device) if not torch.is_tensor(t) or t.ndim == 0 else t
        return model_fn(x, t.float()).float()[:, : x.shape[1]]

    def ode_sample(self, model_fn, noise, steps=250, method="ode-dopri5", atol=1e-6, rtol=1e-3):
        """model_fn(x, t [B]) -> velocity, integrated from t = 0 to 1 through torchdiffeq (SiT's ODE sampler).
        euler: steps - 1 evaluations; heun: 2 per step; dopri5: adaptive, `steps` only sets the output grid."""
        from torchdiffeq import odeint

        if method not in ODE_METHODS:
            raise ValueError(f"ODE method {method!r}: expected one of {', '.join(ODE_METHODS)}")
        if steps < 2:
            raise ValueError(f"ODE sampling needs steps >= 2 grid points (SiT's num_steps), got {steps}")
        grid = torch.linspace(0.0, 1.0, steps, device=noise.device)
        tolerances = {"atol": atol, "rtol": rtol} if method == "ode-dopri5" else {}  # fixed grids have none
        return odeint(lambda t, x: self._velocity(model_fn, x, t), noise.float(), grid, method=ODE_METHODS[method],
                      **tolerances)[-1]

    def sde_sample(self, model_fn, noise, steps=250, generator=None, last_step_size=0.04, diffusion_norm=1.0):
        """Euler-Maruyama with `steps` model evaluations; noise from `generator`."""
        if steps < 2 or not 0 < last_step_size < 1:
            raise ValueError("SDE sampling needs steps >= 2 and 0 < last_step_size < 1")
        x = noise.float()
        grid = torch.linspace(0.0, 1.0 - last_step_size, steps, dtype=torch.float64).tolist()
        h = grid[1] - grid[0]

        def drift(x, t):  # v + w s = v - norm (x - t v)
            v = self._velocity(model_fn, x, t)
            return v - diffusion_norm * (x - t * v)

        for t_cur in grid[:-1]:
            z = torch.randn(x.shape, device=x.device, generator=generator)
            x = x + h * drift(x, t_cur) + (2 * diffusion_norm * (1 - t_cur) * h) ** 0.5 * z
        return x + last_step_size * drift(x, grid[-1])

    def sample(self, model_fn, noise, method="sde", steps=250, generator=None, last_step_size=0.04,
               diffusion_norm=1.0, atol=1e-6, rtol=1e-3):
        """method: 'ode-euler', 'ode-heun', 'ode-dopri5' or 'sde' (Euler-Maruyama)."""
        if method in ODE_METHODS:
            return self.ode_sample(model_fn, noise, steps, method, atol, rtol)
        if method == "sde":
            return self.sde_sample(model_fn, noise, steps, generator, last_step_size, diffusion_norm)
        raise ValueError(f"SiT sampler {method!r}: expected one of {', '.join([*ODE_METHODS, 'sde'])}")
