"""DiT's Gaussian diffusion and SiT's interpolant against closed forms (and diffusers' schedulers as an oracle)."""
import math

import numpy as np
import pytest
import torch

from usp_fast.diffusion import GaussianDiffusion, LinearInterpolant, guided_model, space_timesteps
from usp_fast.diffusion.gaussian import discretized_gaussian_log_likelihood, normal_kl


pytestmark = pytest.mark.usefixtures("one_thread")

T = 1000


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion.dit(learn_sigma=True)


def _abar(t):
    betas = np.linspace(1e-4, 2e-2, T, dtype=np.float64)
    return float(np.prod(1 - betas[: t + 1])), float(betas[t])


def test_schedule_is_dit_linear(diffusion):
    betas = diffusion.table("betas", "cpu")
    assert betas.shape == (T,) and betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(2e-2)
    assert torch.allclose(betas[1:] - betas[:-1], torch.full((T - 1,), (2e-2 - 1e-4) / (T - 1), dtype=torch.float64))


def test_q_sample_closed_form(diffusion):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 417, 999])
    out = diffusion.q_sample(x0, t, eps)
    for b, tb in enumerate(t.tolist()):
        abar, _ = _abar(tb)
        torch.testing.assert_close(out[b], math.sqrt(abar) * x0[b] + math.sqrt(1 - abar) * eps[b])


def test_posterior_is_bayes_of_the_two_gaussians(diffusion):
    """q(x_{t-1}|x_t,x0) ∝ N(x_{t-1}; sqrt(abar_{t-1}) x0, 1-abar_{t-1}) N(x_t; sqrt(alpha_t) x_{t-1}, beta_t)."""
    g = torch.Generator().manual_seed(1)
    x0, xt = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    t = torch.tensor([1, 600])
    mean, var, log_var = diffusion.q_posterior(x0, xt, t)
    for b, tb in enumerate(t.tolist()):
        abar_prev, _ = _abar(tb - 1)
        _, beta = _abar(tb)
        precision = 1 / (1 - abar_prev) + (1 - beta) / beta
        want_var = 1 / precision
        want_mean = want_var * (math.sqrt(abar_prev) * x0[b] / (1 - abar_prev) + math.sqrt(1 - beta) * xt[b] / beta)
        torch.testing.assert_close(mean[b], want_mean, rtol=1e-5, atol=1e-5)
        assert var[b].item() == pytest.approx(want_var, rel=1e-6)
        assert log_var[b].item() == pytest.approx(math.log(want_var), rel=1e-6)


def test_x0_eps_round_trip(diffusion):
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    t = torch.tensor([5, 900])
    xt = diffusion.q_sample(x0, t, eps)
    torch.testing.assert_close(diffusion.predict_x0_from_eps(xt, t, eps), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(diffusion.predict_eps_from_x0(xt, t, x0), eps, rtol=1e-4, atol=1e-4)


def test_kl_and_decoder_likelihood_closed_forms():
    m1, m2 = torch.tensor([0.3, -1.0]), torch.tensor([0.1, 0.5])
    lv1, lv2 = torch.tensor([-1.0, 0.2]), torch.tensor([0.5, -0.3])
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                             torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), want)
    # Interior bins: the probability mass of [x - 1/255, x + 1/255] (ADM's tanh CDF approximation, ~1e-3 accurate).
    x, mean, log_scale = torch.tensor([0.2, -0.5]), torch.tensor([0.1, -0.45]), torch.tensor([-3.0, -4.0])
    normal = torch.distributions.Normal(mean, log_scale.exp())
    exact = (normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255)).log()
    torch.testing.assert_close(discretized_gaussian_log_likelihood(x, mean, log_scale), exact, rtol=2e-2, atol=2e-2)


def test_hybrid_loss_is_zero_for_the_true_posterior_and_vb_trains_only_variance(diffusion):
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 4, 2, 2, generator=g), torch.randn(4, 4, 2, 2, generator=g)
    t = torch.tensor([1, 10, 500, 999])
    xt = diffusion.q_sample(x0, t, noise)
    # eps = the true noise gives the true posterior mean; v = -1 selects the posterior variance.
    perfect = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    terms = diffusion.loss_terms(perfect, x0, xt, t, noise)
    assert terms["mse"].abs().max() < 1e-10 and terms["vb"].abs().max() < 1e-4
    out = torch.randn(4, 8, 2, 2, generator=g, requires_grad=True)
    diffusion.loss_terms(out, x0, xt, t, noise)["vb"].sum().backward()
    assert out.grad[:, :4].abs().max() == 0 and out.grad[:, 4:].abs().max() > 0


def test_respacing_keeps_the_marginals(diffusion):
    spaced = diffusion.respace(250)
    keep = space_timesteps(T, 250)
    assert spaced.num_timesteps == 250 and keep[0] == 0 and keep[-1] == T - 1 and len(set(keep)) == 250
    assert torch.equal(spaced.timestep_map, torch.tensor(keep))
    torch.testing.assert_close(spaced.table("alphas_cumprod", "cpu"), diffusion.table("alphas_cumprod", "cpu")[keep])
    assert space_timesteps(T, "ddim50") == list(range(0, T, 20))
    assert diffusion.respace(T).table("betas", "cpu").allclose(diffusion.table("betas", "cpu"))


def _toy_model(x, t):
    """A fixed smooth function of (x, t) with 2C outputs (epsilon, variance in [-1, 1])."""
    s = (t.float() / T).view(-1, 1, 1, 1)
    return torch.cat([torch.tanh(0.7 * x + s), torch.tanh(x * s - 0.3)], dim=1)


def test_ddpm_matches_diffusers_scheduler(diffusion):
    from diffusers import DDPMScheduler

    steps = 25
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2,
                          variance_type="learned_range", clip_sample=False, timestep_spacing="linspace")
    sched.set_timesteps(steps)
    spaced = diffusion.respace(steps)
    assert sorted(sched.timesteps.tolist()) == spaced.timestep_map.tolist()
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    ours = spaced.p_sample_loop(_toy_model, noise, torch.Generator().manual_seed(5))
    x, g = noise.clone(), torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        x = sched.step(_toy_model(x, t.expand(2)), t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_ddim_matches_diffusers_scheduler(diffusion):
    from diffusers import DDIMScheduler

    steps = 20
    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=2e-2,
                          clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0)
    sched.set_timesteps(steps)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    ours = diffusion.respace(f"ddim{steps}").ddim_sample_loop(_toy_model, noise)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(_toy_model(x, t.expand(2))[:, :4], t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


# ---- Gaussian data: the exact denoiser is known, so samplers must reproduce N(m, s^2) ----------------------------
M, S = 0.5, 0.7


def _exact_model(spaced, full):
    """E[eps | x_t] for x0 ~ N(M, S^2), and the variance channel v in [-1, 1] that selects the optimal reverse
    variance Var[x_{t-1} | x_t] = beta~ + coef1^2 Var[x0 | x_t] (it lies between beta~ and beta for S < 1). With
    both exact, every ancestral step reproduces the true marginal, however few the steps."""
    abar_full = full.table("alphas_cumprod", "cpu")
    index = torch.zeros(T, dtype=torch.long)
    index[spaced.timestep_map] = torch.arange(spaced.num_timesteps)

    def model_fn(x, t):
        k = index[t]
        a = abar_full[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * M) / (a * S**2 + 1 - a)
        var_x0 = S**2 * (1 - a) / (a * S**2 + 1 - a)
        tab = lambda name: spaced.table(name, "cpu")[k].view(-1, 1, 1, 1)  # noqa: E731
        opt = tab("posterior_variance") + tab("posterior_mean_coef1") ** 2 * var_x0
        lo, hi = tab("posterior_log_variance_clipped"), tab("log_betas")
        v = torch.where(k.view(-1, 1, 1, 1) == 0, -1.0, 2 * (opt.log() - lo) / (hi - lo) - 1)
        return torch.cat([eps, v.expand_as(eps)], dim=1).float()

    return model_fn


def _exact_velocity(x, t):
    """E[x1 - eps | x_t] for x1 ~ N(M, S^2), x_t = t x1 + (1 - t) eps (SiT's convention: t = 1 is data)."""
    t = t.view(-1, 1, 1, 1).float()
    var = t**2 * S**2 + (1 - t) ** 2
    return M + (t * S**2 - (1 - t)) * (x - t * M) / var


def test_ddpm_and_ddim_sample_the_gaussian(diffusion):
    noise = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(7))
    spaced = diffusion.respace(10)
    ddpm = spaced.p_sample_loop(_exact_model(spaced, diffusion), noise, torch.Generator().manual_seed(8))
    assert abs(ddpm.mean() - M) < 0.03 and abs(ddpm.std() - S) < 0.03
    # DDIM follows the probability-flow ODE, whose exact map for a Gaussian is x_T -> M + S x_T (first order)
    errors = []
    for steps in (25, 100):
        spaced = diffusion.respace(f"ddim{steps}")
        errors.append((spaced.ddim_sample_loop(_exact_model(spaced, diffusion), noise) - (M + S * noise)).abs().max())
    assert errors[1] < 0.08 and errors[1] < errors[0] / 2.5


def test_clipped_sampling_clamps_x0_and_keeps_samples_in_range(diffusion):
    """x0_range clamps pred_x0 (ADM's clip_denoised); a model whose epsilon is off by a constant runs far out of
    [-1, 1] unclamped and stays inside clamped (the last DDPM step returns the posterior mean of a clamped x0)."""
    lo, hi = torch.tensor(-1.0).view(1, 1, 1, 1), torch.tensor(1.0).view(1, 1, 1, 1)
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900, 900])
    eps = torch.full_like(x, 0.3)
    free = diffusion.p_mean_variance(torch.cat([eps, torch.zeros_like(x)], 1), x, t)
    clipped = diffusion.p_mean_variance(torch.cat([eps, torch.zeros_like(x)], 1), x, t, (lo, hi))
    torch.testing.assert_close(clipped["pred_x0"], free["pred_x0"].clamp(-1, 1))
    assert free["pred_x0"].abs().max() > 1.5
    biased = lambda x, t: torch.cat([x * 0 + 0.3, torch.zeros_like(x)], 1)  # noqa: E731
    spaced = diffusion.respace(10)
    noise = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    unclamped = spaced.p_sample_loop(biased, noise, torch.Generator().manual_seed(3))
    clamped = spaced.p_sample_loop(biased, noise, torch.Generator().manual_seed(3), (lo, hi))
    assert unclamped.abs().max() > 5 and clamped.abs().max() <= 1 + 1e-5
    ddim = diffusion.respace("ddim10").ddim_sample_loop(biased, noise, x0_range=(lo, hi))
    assert ddim.abs().max() <= 1 + 1e-5


def test_interpolant_and_velocity_closed_forms():
    """SiT's convention (transport/path.py ICPlan): x_t = t x1 + (1 - t) x0 with x0 the noise, so t = 0 is noise
    and t = 1 data, and the velocity target is x1 - x0."""
    path = LinearInterpolant()
    g = torch.Generator().manual_seed(9)
    x1, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    torch.testing.assert_close(path.interpolate(x1, eps, torch.zeros(3)), eps)
    torch.testing.assert_close(path.interpolate(x1, eps, torch.ones(3)), x1)
    torch.testing.assert_close(path.velocity_target(x1, eps), x1 - eps)
    t = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    xt = path.interpolate(x1, eps, t)
    torch.testing.assert_close(xt, t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * eps)
    dxdt = torch.autograd.functional.jacobian(lambda tt: path.interpolate(x1, eps, tt).sum(dim=(1, 2, 3)), t.detach())
    torch.testing.assert_close(torch.diagonal(dxdt), path.velocity_target(x1, eps).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(path.data_from_velocity(x1 - eps, xt.detach(), t.detach()), x1)
    # score from velocity on a Gaussian: s = -(x - t M) / (t^2 S^2 + (1-t)^2)
    x, tt = torch.randn(5, 1, 1, 1, generator=g), torch.tensor([0.0, 0.2, 0.5, 0.7, 0.95])
    want = -(x - tt.view(-1, 1, 1, 1) * M) / (tt.view(-1, 1, 1, 1) ** 2 * S**2 + (1 - tt.view(-1, 1, 1, 1)) ** 2)
    torch.testing.assert_close(path.score_from_velocity(_exact_velocity(x, tt), x, tt), want)
    assert path.time_at_noise_level(0.25) == 0.75


def test_sit_samplers_reproduce_the_gaussian():
    path = LinearInterpolant()
    noise = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(10))
    exact = M + S * noise  # the ODE's flow map for Gaussian marginals
    euler = path.sample(_exact_velocity, noise, "ode-euler", 21)
    heun = path.sample(_exact_velocity, noise, "ode-heun", 21)
    dopri5 = path.sample(_exact_velocity, noise, "ode-dopri5", 2)
    err_euler, err_heun = (euler - exact).abs().max(), (heun - exact).abs().max()
    assert err_heun < 2e-3 and err_heun < err_euler / 5
    assert (dopri5 - exact).abs().mean() < 2e-3  # SiT's default solver at its default tolerances (rtol 1e-3)
    tight = path.sample(_exact_velocity, noise, "ode-dopri5", 2, atol=1e-9, rtol=1e-9)
    assert (tight - exact).abs().max() < 1e-5  # the tolerances reach the solver
    sde = path.sample(_exact_velocity, noise, "sde", 100, torch.Generator().manual_seed(11))
    assert abs(sde.mean() - M) < 0.04 and abs(sde.std() - S) < 0.04


def test_sit_step_counts_are_the_official_num_steps():
    """SiT's samplers lay linspace(t0, t1, num_steps): a fixed-grid ODE takes num_steps - 1 steps, the SDE
    num_steps - 1 Euler-Maruyama steps on [0, 1 - last_step_size] plus the mean-only last step."""
    path = LinearInterpolant()
    seen = []

    def velocity(x, t):
        seen.append(float(t[0]))
        return _exact_velocity(x, t)

    noise = torch.randn(8, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    path.sample(velocity, noise, "ode-euler", 5)
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75])
    seen.clear()
    path.sample(velocity, noise, "sde", 5, torch.Generator().manual_seed(2), last_step_size=0.04)
    assert seen == pytest.approx([0.0, 0.24, 0.48, 0.72, 0.96])
    with pytest.raises(ValueError, match="grid points"):
        path.sample(velocity, noise, "ode-euler", 1)


def test_samplers_are_deterministic_per_seed_and_finite(diffusion):
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(12))
    path = LinearInterpolant()
    velocity = lambda x, t: _toy_model(x, t * T)[:, :4]  # noqa: E731
    runs = {
        "ddpm": lambda s: diffusion.sample(_toy_model, noise, "ddpm", 10, torch.Generator().manual_seed(s)),
        "sde": lambda s: path.sample(velocity, noise, "sde", 10, torch.Generator().manual_seed(s)),
    }
    for name, run in runs.items():
        a, b, c = run(0), run(0), run(1)
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name


def test_cfg_scale_one_is_the_conditional_model_and_guidance_mixes_only_guided_channels():
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return torch.cat([x * (1 + y.view(-1, 1, 1, 1).float()), x + 10], dim=1)  # 4 "eps" + 4 "variance"

    x, t, y = torch.randn(2, 4, 2, 2), torch.tensor([3, 3]), torch.tensor([1, 2])
    torch.testing.assert_close(guided_model(model, y, 1.0, null_class=5)(x, t), model(x, t, y))
    assert calls[0] == 2  # no unconditional branch at scale 1
    guided = guided_model(model, y, 4.0, null_class=5, guided_channels=3)(x, t)
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 5))
    torch.testing.assert_close(guided[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
    torch.testing.assert_close(guided[:, 3:], cond[:, 3:])  # channel 3 and the variance half: conditional
    # the full guidance formula at scale 1 reproduces the conditional output
    torch.testing.assert_close(guided_model(model, y, 1.0 + 1e-12, null_class=5)(x, t), cond)
