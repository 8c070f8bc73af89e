"""Diffusion objectives and samplers for the generate stage.

DiT: `GaussianDiffusion` (DDPM, 1000 linear betas, epsilon + learned variance, hybrid loss; DDPM/DDIM sampling on
respaced steps). SiT: `LinearInterpolant` (SiT's convention: x_t = t x1 + (1-t) eps, t = 1 data, velocity target;
ODE Euler/Heun/dopri5 through torchdiffeq, SDE Euler-Maruyama). `guided_model` wraps a model with classifier-free guidance for either sampler.
"""
from .gaussian import GaussianDiffusion, linear_betas, space_timesteps
from .guidance import guided_model
from .interpolant import LinearInterpolant

OBJECTIVES = ("ddpm", "linear")
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "linear": ("ode-heun", "ode-euler", "ode-dopri5", "sde")}


def default_objective(family):
    return {"DiT": "ddpm", "SiT": "linear"}[family]


def create_objective(name, learn_sigma=True):
    """'ddpm' -> GaussianDiffusion over 1000 steps; 'linear' -> LinearInterpolant."""
    if name == "ddpm":
        return GaussianDiffusion.dit(learn_sigma=learn_sigma)
    if name == "linear":
        return LinearInterpolant()
    raise ValueError(f"objective {name!r}: expected one of {OBJECTIVES}")


def sample(objective, model_fn, noise, method, steps, generator=None, **kwargs):
    """Run the objective's sampler `method` for `steps` steps from `noise`."""
    if method not in SAMPLERS["ddpm" if isinstance(objective, GaussianDiffusion) else "linear"]:
        raise ValueError(f"sampler {method!r} does not fit {type(objective).__name__}; valid: "
                         f"{SAMPLERS['ddpm' if isinstance(objective, GaussianDiffusion) else 'linear']}")
    return objective.sample(model_fn, noise, method, steps, generator, **kwargs)


__all__ = ["GaussianDiffusion", "LinearInterpolant", "guided_model", "linear_betas", "space_timesteps",
           "create_objective", "default_objective", "sample", "OBJECTIVES", "SAMPLERS"]
