"""Which reference statistics decide FID and sFID (ADM's evaluator: an .npz's stored mu/sigma win over its images,
which then serve precision/recall only), and the float64 Frechet distance. A small fake extractor stands in for
Inception, so each test runs in well under a second."""
import json

import numpy as np
import pytest
import torch

from usp_fast.errors import UserError
from usp_fast.metrics import generation as gen
from usp_fast.metrics.inception import SPATIAL

POOL_D, SPATIAL_D = 16, 12


class FakeInception:
    """Fixed random projections of 4x4 average-pooled pixels: a 16-d 'pool' and a 12-d 'spatial' feature that
    depend on the image, any input size, no network."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w_pool, self.w_spatial = torch.randn(48, POOL_D, generator=g), torch.randn(48, SPATIAL_D, generator=g)

    def get_requested_features_list(self):
        return [gen.POOL, SPATIAL]

    def __call__(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)
        return x @ self.w_pool, torch.tanh(x @ self.w_spatial)


@pytest.fixture
def fake():
    return FakeInception()


def images(n, seed, brightness=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, 8, 8, 3)) + brightness, 0, 255).astype(np.uint8)


def features(extractor, arr):
    """-> (pool, spatial) float64 arrays, straight from the extractor (not through the evaluator)."""
    with torch.no_grad():
        pool, spatial = extractor(torch.from_numpy(arr).permute(0, 3, 1, 2))
    return pool.double().numpy(), spatial.double().numpy()


def gaussian(x):
    return x.mean(0), np.cov(x, rowvar=False)


def adm_frechet(mu1, s1, mu2, s2):
    """The textbook formula with scipy's matrix square root of S1 S2, as ADM's evaluator takes it."""
    from scipy import linalg

    covmean = linalg.sqrtm(np.asarray(s1, np.float64) @ np.asarray(s2, np.float64)).real
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def wrong_stats(x):
    """Statistics that are deliberately not those of features x (shifted mean, inflated covariance)."""
    mu, sigma = gaussian(x)
    return mu + 2.0, 3 * sigma + 0.5 * np.eye(len(mu))


@pytest.fixture
def adm_batch(tmp_path, fake):
    """An ADM-layout reference: 40 images under arr_0 plus stored mu/sigma/mu_s/sigma_s that disagree with them."""
    ref = images(40, seed=1)
    pool, spatial = features(fake, ref)
    mu, sigma = wrong_stats(pool)
    mu_s, sigma_s = wrong_stats(spatial)
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, arr_0=ref, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    return path, ref, dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)


@pytest.fixture
def samples(tmp_path):
    arr = images(30, seed=2, brightness=10)
    np.savez(tmp_path / "samples.npz", arr_0=arr)
    return tmp_path / "samples.npz", arr


def test_adm_batch_fid_and_sfid_use_the_stored_statistics_and_its_images_only_precision_recall(
        tmp_path, fake, adm_batch, samples):
    ref_path, ref, stored = adm_batch
    samples_path, arr = samples
    out = gen.evaluate(samples_path, ref_path, cache_dir=tmp_path / "cache", batch_size=16, extractor=fake)

    pool, spatial = features(fake, arr)
    ref_pool, _ = features(fake, ref)
    want_fid = adm_frechet(*gaussian(pool), stored["mu"], stored["sigma"])
    want_sfid = adm_frechet(*gaussian(spatial), stored["mu_s"], stored["sigma_s"])
    images_fid = adm_frechet(*gaussian(pool), *gaussian(ref_pool))
    assert out["fid"] == pytest.approx(want_fid, rel=1e-6)
    assert out["sfid"] == pytest.approx(want_sfid, rel=1e-6)
    assert abs(out["fid"] - images_fid) > 0.1 * want_fid  # the images' own statistics would give another FID
    # precision/recall come from the reference images' features
    p, r = gen.precision_recall(pool, ref_pool)
    assert (out["precision"], out["recall"]) == (pytest.approx(p, abs=1e-9), pytest.approx(r, abs=1e-9))
    assert 0 < out["precision"] < 1 and 0 < out["recall"] < 1 and "precision_recall" not in out["notes"]
    ref_info = out["reference"]
    assert (ref_info["statistics"], ref_info["spatial_statistics"], ref_info["pr_features"],
            ref_info["stored_dtype"], ref_info["count"]) == ("stored", "stored", "images", "float64", 40)

    again = gen.evaluate(samples_path, ref_path, cache_dir=tmp_path / "cache", batch_size=16, extractor=fake)
    assert again["reference"]["cached"] is True and again["fid"] == pytest.approx(out["fid"], rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_statistics_only_npz_in_float64_and_float32(tmp_path, fake, samples, dtype):
    samples_path, arr = samples
    pool, spatial = features(fake, arr)
    mu, sigma = wrong_stats(features(fake, images(50, seed=3))[0])
    mu_s, sigma_s = wrong_stats(spatial)
    ref = tmp_path / "stats.npz"
    np.savez(ref, mu=mu.astype(dtype), sigma=sigma.astype(dtype), mu_s=mu_s.astype(dtype),
             sigma_s=sigma_s.astype(dtype))
    out = gen.evaluate(samples_path, ref, cache_dir=tmp_path / "cache", extractor=fake)

    # against the float64 statistics: float32 storage rounds them at ~1e-7, which moves FID far less than 1e-5
    assert out["fid"] == pytest.approx(adm_frechet(*gaussian(pool), mu, sigma), rel=1e-5)
    assert out["sfid"] == pytest.approx(adm_frechet(*gaussian(spatial), mu_s, sigma_s), rel=1e-5)
    assert out["precision"] is None and out["recall"] is None and "arr_0" in out["notes"]["precision_recall"]
    info = out["reference"]
    assert (info["statistics"], info["pr_features"], info["stored_dtype"]) == \
        ("stored", None, np.dtype(dtype).name)
    assert not (tmp_path / "cache").exists()  # nothing to compute, nothing cached

    np.savez(ref, mu=mu.astype(dtype), sigma=sigma.astype(dtype))  # pool statistics only: no sFID
    out = gen.evaluate(samples_path, ref, cache_dir=tmp_path / "cache", extractor=fake)
    assert out["sfid"] is None and "spatial" in out["notes"]["sfid"] and out["reference"]["spatial_statistics"] is None


def test_images_only_reference_computes_its_statistics(tmp_path, fake, samples):
    samples_path, arr = samples
    ref = images(40, seed=1)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    out = gen.evaluate(samples_path, tmp_path / "ref.npz", cache_dir=tmp_path / "cache", extractor=fake)
    pool, _ = features(fake, arr)
    assert out["fid"] == pytest.approx(adm_frechet(*gaussian(pool), *gaussian(features(fake, ref)[0])), rel=1e-6)
    info = out["reference"]
    assert (info["statistics"], info["spatial_statistics"], info["pr_features"], info["stored_dtype"]) == \
        ("computed from images", "computed from images", "images", None)


def test_result_json_records_stored_statistics(tmp_path, fake, adm_batch, samples, monkeypatch):
    from usp_fast.evaluation import evaluate_samples

    monkeypatch.setattr(gen, "make_extractor", lambda *a, **k: fake)
    ref_path, _, stored = adm_batch
    np.savez(ref_path, arr_0=images(40, seed=1), **{k: v.astype(np.float32) for k, v in stored.items()})
    samples_path, _ = samples
    evaluate_samples(samples_path, ref_path, device="cpu", cache_dir=tmp_path / "cache")
    written = json.loads((tmp_path / "samples_eval.json").read_text())["reference"]
    assert (written["statistics"], written["spatial_statistics"], written["pr_features"], written["stored_dtype"]) \
        == ("stored", "stored", "images", "float32")
    assert written["source"] == str(ref_path)


def test_frechet_is_float64_for_any_input_dtype_and_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 24)), rng.normal(size=(300, 24)) * 1.4 + 0.3
    (mu1, s1), (mu2, s2) = gaussian(a), gaussian(b)
    want = adm_frechet(mu1, s1, mu2, s2)
    assert gen.frechet(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    f32 = [x.astype(np.float32) for x in (mu1, s1, mu2, s2)]
    assert gen.frechet(*f32) == pytest.approx(adm_frechet(*f32), rel=1e-6)  # same rounded inputs
    assert gen.frechet(*f32) == pytest.approx(want, rel=1e-5)
    assert gen.frechet(f32[0], s1, mu2, f32[3]) == pytest.approx(want, rel=1e-5)  # mixed dtypes: no assertion
    with pytest.raises(gen.EvalError, match="mismatched statistics"):
        gen.frechet(mu1, s1, mu2[:10], s2[:10, :10])


def test_frechet_with_singular_covariance_matches_the_svd_route():
    """Fewer samples than dimensions (as a small sample set against 2048-d features): S1 is singular."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(10, 40)), rng.normal(size=(60, 40)) + 0.2
    xa, ya = x - x.mean(0), y - y.mean(0)
    cross = np.linalg.svd(xa @ ya.T / np.sqrt(9 * 59), compute_uv=False).sum()  # sum of sqrt eig(Sx Sy)
    want = ((x.mean(0) - y.mean(0)) ** 2).sum() + (xa ** 2).sum() / 9 + (ya ** 2).sum() / 59 - 2 * cross
    # round-off eigenvalues ~1e-16 of the singular S1 enter as their square roots, ~1e-8 each: hence 1e-6
    assert gen.frechet(*gaussian(x), *gaussian(y)) == pytest.approx(want, rel=1e-6)
    assert gen.frechet(*gaussian(y), *gaussian(x)) == pytest.approx(want, rel=1e-6)  # symmetric in its arguments


def test_bad_reference_npz_is_one_line_naming_file_and_key(tmp_path, fake, samples, monkeypatch):
    d = POOL_D

    def fails(match, **arrays):
        path = tmp_path / "bad.npz"
        np.savez(path, **arrays)
        with pytest.raises(gen.EvalError, match=match) as e:
            gen.reference_statistics(path, fake, "fake", tmp_path / "cache")
        assert "bad.npz" in str(e.value) and "\n" not in str(e.value)
        assert isinstance(e.value, UserError)

    fails(r"expected 'arr_0' images or 'mu'/'sigma' statistics, found keys \['images'\]",
          images=np.zeros((2, 8, 8, 3), np.uint8))
    fails(r"'mu' is 2048-d but this Inception's pool features are 16-d", mu=np.zeros(2048),
          sigma=np.eye(2048, dtype=np.float32))
    fails(r"'mu_s' is 5-d but this Inception's spatial features are 12-d", mu=np.zeros(d), sigma=np.eye(d),
          mu_s=np.zeros(5), sigma_s=np.eye(5))
    fails(r"'sigma' must be a square 16 x 16 float matrix \(as 'mu' is 16-d\), got float64 \[16, 15\]",
          mu=np.zeros(d), sigma=np.zeros((d, d - 1)))
    fails(r"'mu' must be a 1-d float vector, got float64 \[1, 16\]", mu=np.zeros((1, d)), sigma=np.eye(d))
    fails(r"'sigma_s' has 1 non-finite values", mu=np.zeros(d), sigma=np.eye(d), mu_s=np.zeros(SPATIAL_D),
          sigma_s=np.diag([np.nan] + [1.0] * (SPATIAL_D - 1)))
    fails(r"has 'mu' but no 'sigma'", mu=np.zeros(d), arr_0=images(4, seed=0))
    fails(r"has 'mu_s'/'sigma_s' but no 'mu'/'sigma'", arr_0=images(4, seed=0), mu_s=np.zeros(SPATIAL_D),
          sigma_s=np.eye(SPATIAL_D))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(gen.EvalError, match="bad.npz: not a readable .npz"):
        gen.reference_statistics(tmp_path / "bad.npz", fake, "fake", tmp_path / "cache")

    from usp_fast.evaluation import evaluate_samples  # the command's path: a UserError, printed as one line

    monkeypatch.setattr(gen, "make_extractor", lambda *a, **k: fake)
    with pytest.raises(UserError, match="evaluate: .*bad.npz: not a readable .npz"):
        evaluate_samples(samples[0], tmp_path / "bad.npz", device="cpu", cache_dir=tmp_path / "cache")
