"""The fidelity experiment's evaluation: FID of generated images against one dataset's real images at the generation
resolution (TF-Inception pool features, with a bootstrap interval), the floors that FID cannot go below at the
experiment's sample count (the VAE's reconstructions, a real subset; phase 4), and each arm checkpoint's EMA
samples, drawn by usp_fast.sampling.Sampler with fixed seeds (the same noise for every arm and training seed).
Beside FID: KID (unbiased, so comparable at small sample counts) and FID extrapolated to infinite samples. Each
evaluation's Inception pool features are kept (features/<arm>_seed<k>_step<s>.npz) so every number can be
recomputed, and the report's paired bootstrap over seeds and samples reads them (`FastFID`)."""
import tempfile

import numpy as np

DATASETS = ("imagenet", "clothing")
# the image list each dataset's real images (and its generators' training images) come from
REAL_IMAGES = {"imagenet": "imagenet", "clothing": "clothing_train"}


class Evaluator:
    """FIDs of one experiment, on its device; the VAE and the Inception network are loaded once, when first used."""

    def __init__(self, ws):
        import torch

        self.ws, self.p = ws, ws.p
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._vae = self._extractor = None
        self.refs = {}

    @property
    def vae(self):
        if self._vae is None:
            from usp_fast.vae import load_vae

            self._vae = load_vae(str(self.ws.vae_dir), 1.0, device=self.device)
        return self._vae

    @property
    def extractor(self):
        if self._extractor is None:
            from usp_fast.metrics.generation import make_extractor

            self._extractor = make_extractor(device=self.device, cache_dir=self.ws.dir / "inception")
        return self._extractor

    def features(self, images):
        """uint8 [N, H, W, 3] -> float64 [N, 2048] TF-Inception pool features."""
        import torch

        out, batch = [], self.p.eval.batch
        with torch.inference_mode():
            for lo in range(0, len(images), batch):
                x = torch.from_numpy(np.ascontiguousarray(images[lo:lo + batch])).permute(0, 3, 1, 2)
                out.append(self.extractor(x.to(self.device))[0].double().cpu().numpy())
        return np.concatenate(out)

    # ---- the real images: reference statistics and floors ----

    def reference(self, dataset):
        """Real images of `dataset` at the generation resolution (ADM centre crop): their features' statistics, and
        the floors at the experiment's sample count: the VAE's reconstructions and a real subset. The images and
        features are stored in the work folder (reference/), the rest is recomputed from them."""
        if dataset not in self.refs:
            from usp_fast.metrics.generation import bootstrap_fid

            z = np.load(self._reference_file(dataset))
            feats, e = z["features"], self.p.eval
            mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
            floors = {kind: {**bootstrap_fid(f, mu, sigma, e.bootstrap, e.seed), **self.kid(f, feats)}
                      for kind, f in (("recon", z["recon_features"]), ("real_subset", feats[: e.num_samples]))}
            self.refs[dataset] = {"mu": mu, "sigma": sigma, "count": len(feats), "floors": floors, "features": feats,
                                  "real": z["real"][:8], "recon": z["recon"][:8]}
        return self.refs[dataset]

    def _reference_file(self, dataset):
        """reference/<dataset>_<resolution>.npz: the real images, the first `num_samples` of them through the VAE,
        and both's features (made once)."""
        from usp_fast.data.images import list_images
        from usp_fast.io import atomic_path
        from usp_fast.pictures import to_uint8
        from usp_fast.restoration import load_images

        path = self.ws.dir / "reference" / f"{dataset}_{self.p.resolution}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            return path
        items, _ = list_images(file_list=self.ws.image_list(REAL_IMAGES[dataset]))
        n = self.p.eval.num_samples
        real, recon = [], []
        for lo in range(0, len(items), 32):
            x = load_images([p for p, _ in items[lo:lo + 32]], self.p.resolution).to(self.device)
            real.append(to_uint8(x))
            if lo < n:
                recon.append(to_uint8(self.vae.decode(self.vae.encode(x)[0])))
        real, recon = np.concatenate(real), np.concatenate(recon)[:n]
        feats, recon_feats = self.features(real), self.features(recon)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, real=real, recon=recon, features=feats, recon_features=recon_feats)
        return path

    # ---- an arm's checkpoint ----

    def kid(self, features, real):
        """KID of `features` against the real ones: its mean and std over `eval.kid_subsets` subsets."""
        from usp_fast.metrics.generation import kid

        e = self.p.eval
        out = kid(features, real, e.kid_subsets, e.kid_subset_size, e.seed)
        return {"kid": out["kid"], "kid_std": out["std"], "kid_subset_size": out["subset_size"]}

    def evaluate(self, ckpt, arm, step):
        """FID (bootstrap interval), KID and FID_inf of `eval.num_samples` EMA samples of checkpoint `ckpt` (arm
        `arm` at `step`) against its dataset's real images. The features go to features/<run>_step<s>.npz (path
        relative to the work folder in the result); the first 8 samples to the run folder, for the picture."""
        from usp_fast.io import atomic_path
        from usp_fast.metrics.generation import bootstrap_fid

        e = self.p.eval
        ref = self.reference(arm.dataset)
        images, method = self.sample(ckpt, arm)
        np.save(self.ws.dir / arm.run_name / f"samples_step{step}_first8.npy", images[:8])
        feats = self.features(images)
        rel = f"features/{arm.run_name}_step{step}.npz"
        (self.ws.dir / "features").mkdir(parents=True, exist_ok=True)
        with atomic_path(self.ws.dir / rel) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, features=feats)
        fid = bootstrap_fid(feats, ref["mu"], ref["sigma"], e.bootstrap, e.seed)
        return {"step": step, "seed": arm.seed, **fid, **self.kid(feats, ref["features"]),
                **fid_infinity(FastFID(feats, ref["mu"], ref["sigma"]), e.fid_inf_points, e.fid_inf_min,
                               e.fid_inf_draws, e.seed),
                "num_samples": e.num_samples, "sampler": f"{method}-{e.sampling_steps}", "precision": e.precision,
                "ema": True, "features": rel}

    def sample(self, ckpt, arm):
        """`eval.num_samples` images of `ckpt`'s EMA weights -> (uint8 [N, H, W, 3], sampler method). Sampler writes
        them into a samples.npz in a scratch folder, deleted once read."""
        from usp_fast.sampling import Sampler, merge_shards
        from usp_fast.stages import load_config

        e = self.p.eval
        method = e.dit_method if arm.family == "DiT" else e.sit_method  # a DiT arm is DDPM, a SiT arm linear
        with tempfile.TemporaryDirectory(dir=self.ws.dir / arm.run_name, prefix="sampling_") as scratch:
            cfg = load_config({
                "run": {"out_dir": str(self.ws.dir), "name": arm.run_name},
                "vae": {"name": str(self.ws.vae_dir), "scale": 1.0},
                "sample": {"checkpoint": str(ckpt), "ema": True, "method": method, "steps": e.sampling_steps,
                           "seed": e.seed, "cfg_scale": 1.0, "precision": e.precision, "num_images": e.num_samples, "batch": e.batch,
                           "out_dir": scratch}}, stage="generate")
            sampler = Sampler(cfg, self.device)
            sampler.open_output()
            sampler.fill()
            with np.load(merge_shards(sampler.out)) as z:
                return z["arr_0"], sampler.method


class FastFID:
    """Exact FID of any (re)sampling of one evaluation's features against the real Gaussian (mu, sigma), cheap
    enough for thousands of bootstrap draws: with X the features, P = X S X^T is computed once, and for the rows
    `idx` (m of them, repeats allowed) the centred Gram matrix Xc S Xc^T follows from P alone, whose eigenvalues
    give tr sqrt(S1 S) as in generation.frechet_from_features (which it equals)."""

    def __init__(self, features, mu, sigma):
        self.x = np.asarray(features, dtype=np.float64)
        self.mu, self.trace_sigma = np.asarray(mu, dtype=np.float64), float(np.trace(sigma))
        self.p = (self.x @ np.asarray(sigma, dtype=np.float64)) @ self.x.T
        self.sq = (self.x * self.x).sum(1)
        self.n = len(self.x)

    def __call__(self, idx=None):
        idx = np.arange(self.n) if idx is None else np.asarray(idx)
        m = len(idx)
        q = self.p[np.ix_(idx, idx)]
        a = q.mean(1)  # x_i^T S mean
        gram = (q - a[:, None] - a[None, :] + q.mean()) / (m - 1)
        eig = np.linalg.eigvalsh((gram + gram.T) / 2)
        mean = self.x[idx].mean(0)
        trace_s1 = (self.sq[idx].sum() - m * mean @ mean) / (m - 1)
        diff = mean - self.mu
        return float(diff @ diff + trace_s1 + self.trace_sigma - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def fid_infinity(fast, points=5, smallest=0.5, draws=5, seed=0):
    """FID extrapolated to infinitely many samples (Chong & Forsyth, CVPR 2020): FID is biased upwards by about
    c / n, so FID at several sample counts n (random subsets without replacement, `draws` per count below the
    full set), fitted by least squares as FID_inf + c / n, has FID_inf as its intercept. With our few hundred
    samples against 2048 dimensions the fit extrapolates far, so FID_inf is a less biased but noisier number than
    FID. -> {"fid_inf", "fid_inf_slope", "fid_inf_points": [[n, FID], ...]}."""
    rng = np.random.default_rng(seed)
    sizes = sorted({max(round(fast.n * float(f)), 2) for f in np.linspace(smallest, 1.0, points)})
    curve = []
    for n in sizes:
        subsets = [None] if n == fast.n else [rng.choice(fast.n, n, replace=False) for _ in range(draws)]
        curve.append([n, float(np.mean([fast(idx) for idx in subsets]))])
    pts = np.asarray(curve)
    if len(pts) < 2:
        return {"fid_inf": None, "fid_inf_slope": None, "fid_inf_points": curve}
    slope, intercept = np.polyfit(1.0 / pts[:, 0], pts[:, 1], 1)
    return {"fid_inf": float(intercept), "fid_inf_slope": float(slope), "fid_inf_points": curve}
