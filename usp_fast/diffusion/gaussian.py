"""DDPM Gaussian diffusion as DiT trains and samples it.

Schedule: 1000 steps, betas linear from 1e-4 to 2e-2 (Ho et al. 2020). The model predicts epsilon and, with
learn_sigma, a value v in [-1, 1] per latent element that interpolates the log-variance between the posterior
variance beta~_t and beta_t (Nichol & Dhariwal 2021, "learned range"). Training loss = L_simple (MSE on epsilon)
+ L_vlb (the variational bound term, with the mean prediction detached so it trains only the variance), as DiT/ADM.
Sampling: ancestral DDPM and DDIM on a respaced subset of the steps (e.g. 250 evenly spaced), where the respaced
process has its own betas 1 - abar_k / abar_{k-1} and the model is still called with the original step index.

Own code rather than diffusers' schedulers: those have no VLB terms, so the hybrid loss needs this posterior code
anyway, and one home for it keeps training and sampling consistent. tests/test_diffusion.py checks every formula
against closed forms and the DDPM/DDIM sampling steps against diffusers' DDPMScheduler / DDIMScheduler.
Tables are built in float64 and gathered per timestep as float32 (as ADM), cached per device so the training step
does no host-to-device copies.
"""
import math

import numpy as np
import torch


def linear_betas(num_timesteps=1000, beta_start=1e-4, beta_end=2e-2):
    """DDPM's linear schedule, scaled so that any step count spans the same noise range as 1000 steps."""
    scale = 1000 / num_timesteps
    return np.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps, spec):
    """Steps of the original process kept for sampling. spec: N or "N" -> N steps evenly spread over [0, T-1]
    (rounded, as ADM's single section); "ddimN" -> every (T/N)-th step starting at 0 (ADM's DDIM striding)."""
    spec = str(spec)
    if spec.startswith("ddim"):
        n = int(spec[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == n:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot stride {num_timesteps} steps into exactly {n}")
    n = int(spec)
    if not 1 <= n <= num_timesteps:
        raise ValueError(f"cannot keep {n} of {num_timesteps} steps")
    if n == 1:
        return [0]
    stride, position, kept = (num_timesteps - 1) / (n - 1), 0.0, []
    for _ in range(n):  # accumulated, as ADM, so the rounding matches its step sets exactly
        kept.append(round(position))
        position += stride
    return kept


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) under N(means, e^(2 log_scales)) discretised into 255 bins of [-1, 1] (ADM's decoder term at t=0)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x):
    return x.mean(dim=tuple(range(1, x.ndim)))


class GaussianDiffusion:
    def __init__(self, betas, learn_sigma=True, timestep_map=None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        acp = np.cumprod(1.0 - betas)
        acp_prev = np.append(1.0, acp[:-1])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        # log of the posterior variance, with its t=0 value (0) replaced by t=1's so the log stays finite
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(betas)
        tables = {
            "betas": betas,
            "alphas_cumprod": acp,
            "alphas_cumprod_prev": acp_prev,
            "sqrt_alphas_cumprod": np.sqrt(acp),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1.0),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_log_var,
            "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
            "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp),
            "log_betas": np.log(betas),
            # fixed "large" variance (used without learn_sigma): beta_t, with beta~_1 at t=0
            "fixed_large_log_variance": np.log(np.append(post_var[1] if len(betas) > 1 else betas[0], betas[1:])),
        }
        # original step index of each (respaced) step: what the model is conditioned on
        tables["timestep_map"] = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)
        self._tables = {k: torch.from_numpy(v) for k, v in tables.items()}
        self._on_device = {}

    @classmethod
    def dit(cls, learn_sigma=True, num_timesteps=1000):
        return cls(linear_betas(num_timesteps), learn_sigma)

    def respace(self, spec):
        """A diffusion over the kept steps of this one (see space_timesteps), same marginals at those steps."""
        keep = space_timesteps(self.num_timesteps, spec)
        acp = self._tables["alphas_cumprod"].numpy()
        last, betas = 1.0, []
        for i in keep:
            betas.append(1.0 - acp[i] / last)
            last = acp[i]
        return GaussianDiffusion(np.array(betas), self.learn_sigma, self.timestep_map.numpy()[keep])

    @property
    def timestep_map(self):
        return self._tables["timestep_map"]

    # ---- tables -----------------------------------------------------------------------------------------------
    def table(self, name, device):
        key = (name, str(device))
        if key not in self._on_device:
            self._on_device[key] = self._tables[name].to(device)
        return self._on_device[key]

    def _at(self, name, t, like):
        """Gather table[t] as float32, shaped to broadcast against `like` [B, ...]."""
        return self.table(name, t.device)[t].float().view(-1, *([1] * (like.ndim - 1)))

    # ---- forward process and posterior ------------------------------------------------------------------------
    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0, x_t, t):
        """q(x_{t-1} | x_t, x0) -> (mean, variance, clipped log-variance)."""
        mean = self._at("posterior_mean_coef1", t, x_t) * x0 + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_variance", t, x_t), self._at("posterior_log_variance_clipped", t, x_t)

    def predict_x0_from_eps(self, x_t, t, eps):
        return self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def predict_eps_from_x0(self, x_t, t, x0):
        return (self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self._at("sqrt_recipm1_alphas_cumprod", t, x_t)

    def p_mean_variance(self, model_output, x_t, t, x0_range=None):
        """Model output [B, C or 2C, ...] at step index t of this process -> p(x_{t-1} | x_t) as a dict
        (mean, log_variance, pred_x0). x0_range: (low, high) tensors broadcastable to x_t that pred_x0 is clamped
        to (ADM's clip_denoised for data with a known range), or None."""
        C = x_t.shape[1]
        eps = model_output[:, :C]
        if self.learn_sigma:
            frac = (model_output[:, C:2 * C] + 1) / 2
            log_var = frac * self._at("log_betas", t, x_t) + (1 - frac) * self._at("posterior_log_variance_clipped", t, x_t)
        else:
            log_var = self._at("fixed_large_log_variance", t, x_t).expand_as(x_t)
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if x0_range is not None:
            pred_x0 = torch.maximum(torch.minimum(pred_x0, x0_range[1]), x0_range[0])
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return {"mean": mean, "log_variance": log_var, "pred_x0": pred_x0, "eps": eps}

    # ---- training ---------------------------------------------------------------------------------------------
    def vb_terms(self, model_output, x0, x_t, t):
        """Per-sample variational bound term in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0,
        the discretised decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def loss_terms(self, model_output, x0, x_t, t, noise):
        """-> {'mse': [B], 'vb': [B] (learn_sigma only), 'loss': [B]}, all fp32."""
        C = x0.shape[1]
        model_output = model_output.float()
        terms = {"mse": mean_flat((noise - model_output[:, :C]) ** 2)}
        if self.learn_sigma:
            # The bound trains only the variance: the epsilon half enters detached (L_simple trains it).
            frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
            terms["vb"] = self.vb_terms(frozen, x0, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def training_loss(self, model, x0, y, generator):
        """One micro-batch: t ~ U{0..T-1}, noise ~ N(0, I), both from `generator`. -> (loss, metrics)."""
        x0f = x0.float()
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0f.shape, device=x0.device, generator=generator)
        x_t = self.q_sample(x0f, t, noise)
        out = model(x_t.to(x0.dtype), self.table("timestep_map", t.device)[t], y)
        terms = self.loss_terms(out, x0f, x_t, t, noise)
        metrics = {"mse": terms["mse"].mean()}
        if "vb" in terms:
            metrics["vb"] = terms["vb"].mean()
        return terms["loss"].mean(), metrics

    # ---- sampling ---------------------------------------------------------------------------------------------
    def p_sample_loop(self, model_fn, noise, generator=None, x0_range=None):
        """Ancestral sampling from x_T = noise. model_fn(x, t_original) -> output. Noise from `generator`."""
        x = noise.float()
        steps = self.table("timestep_map", x.device)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = self.p_mean_variance(model_fn(x, steps[t]).float(), x, t, x0_range)
            x = out["mean"]
            if i > 0:
                z = torch.randn(x.shape, device=x.device, generator=generator)
                x = x + torch.exp(0.5 * out["log_variance"]) * z
        return x

    def ddim_sample_loop(self, model_fn, noise, generator=None, eta=0.0, x0_range=None):
        """DDIM (Song et al. 2021); eta=0 is deterministic, eta=1 matches DDPM's posterior variance."""
        x = noise.float()
        steps = self.table("timestep_map", x.device)
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = self.p_mean_variance(model_fn(x, steps[t]).float(), x, t, x0_range)
            eps = self.predict_eps_from_x0(x, t, out["pred_x0"])
            abar, abar_prev = self._at("alphas_cumprod", t, x), self._at("alphas_cumprod_prev", t, x)
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            x = out["pred_x0"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
            if eta > 0 and i > 0:
                x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator)
        return x

    def sample(self, model_fn, noise, method="ddpm", steps=250, generator=None, eta=0.0, x0_range=None):
        """method 'ddpm' (respaced to `steps`) or 'ddim' (ADM's DDIM striding, `steps` steps)."""
        if method == "ddpm":
            return self.respace(steps).p_sample_loop(model_fn, noise, generator, x0_range)
        if method == "ddim":
            return self.respace(f"ddim{steps}").ddim_sample_loop(model_fn, noise, generator, eta, x0_range)
        raise ValueError(f"DiT sampler {method!r}: expected 'ddpm' or 'ddim'")
