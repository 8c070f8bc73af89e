"""The classifier of --stage finetune: timm's VisionTransformer shaped as an exported encoder, on latents, with
global average pooling + fc_norm (MAE's fine-tuning head), and from_pretrained / save_pretrained of its folder
(model.safetensors + meta.json) through usp_fast.hub. The finetune stage builds it with `build_classifier`."""
import json
import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..artifacts import ExportError
from ..hub import ExportHubMixin, load, registry_name
from ..io import atomic_path, atomic_write_text
from .usp_vit import MODELS

CLASSIFIER_FORMAT = "usp-fast-classifier/1"


@dataclass
class ClassifierConfig:
    embed_dim: int
    depth: int
    num_heads: int
    num_classes: int
    latent_size: int
    patch_size: int = 2
    in_chans: int = 4
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6


def infer_classifier_config(state, meta, where):
    """A classifier folder whose meta.json records no architecture (written by --stage finetune before it did):
    sizes from the weights; heads (not in any shape) and LayerNorm eps from the encoder export meta.json names,
    else from the usp_vit_* registry by width and depth."""
    try:
        w = state["patch_embed.proj.weight"]
        width, chans, patch = w.shape[0], w.shape[1], w.shape[2]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / width
        num_classes = state["head.weight"].shape[0]
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    except (KeyError, ValueError) as e:
        raise ExportError(f"{where}: model.safetensors does not hold a classifier's weights (no {e})") from None
    enc = Path(meta.get("encoder") or "") / "encoder.json"
    c = json.loads(enc.read_text())["config"] if meta.get("encoder") and enc.is_file() else None
    if c and (c["embed_dim"], c["depth"]) == (width, depth):
        heads, eps = c["num_heads"], c.get("norm_eps", 1e-6)
    else:
        name = registry_name({n: {"embed_dim": m["embed_dim"], "depth": m["depth"]} for n, m in MODELS.items()},
                             {"embed_dim": width, "depth": depth})
        if name is None:
            raise ExportError(f"{where} records no architecture and the encoder export it names ({enc}) is gone: "
                              f"the heads of a {width}x{depth} classifier are unknown; add \"config\" to meta.json")
        heads, eps = MODELS[name]["num_heads"], 1e-6
    return ClassifierConfig(embed_dim=width, depth=depth, num_heads=heads, num_classes=num_classes,
                            latent_size=grid * patch, patch_size=patch, in_chans=chans, mlp_ratio=mlp_ratio,
                            norm_eps=eps)


class Classifier(VisionTransformer, ExportHubMixin):
    """timm's ViT on latents, global average pool + fc_norm, with from_pretrained / save_pretrained of its folder
    (model.safetensors + meta.json). `drop_path`: stochastic depth while fine-tuning (not part of the weights)."""

    HUB_FILES = ("model.safetensors", "meta.json")

    def __init__(self, cfg: ClassifierConfig, drop_path: float = 0.0):
        super().__init__(img_size=cfg.latent_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                         num_classes=cfg.num_classes, global_pool="avg", fc_norm=True, embed_dim=cfg.embed_dim,
                         depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                         drop_path_rate=drop_path, norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps))
        self.cfg = cfg

    @classmethod
    def from_pretrained(cls, path, **hub_kwargs):
        """A classifier folder (runs/<name>/classifier, or its model.safetensors) or a hub id holding one ->
        (Classifier, fp32, eval; meta). hub_kwargs (revision, cache_dir, token, ...) go to huggingface_hub."""
        model = load(cls, path, **hub_kwargs)
        return model, model.export_meta

    @classmethod
    def _load_folder(cls, folder):
        folder = folder.parent if folder.is_file() else folder
        st, js = folder / "model.safetensors", folder / "meta.json"
        for f in (st, js):
            if not f.is_file():
                raise ExportError(f"{f} is missing: expected a classifier folder from --stage finetune "
                                  "(runs/<name>/classifier)")
        meta = json.loads(js.read_text())
        if meta.get("format", CLASSIFIER_FORMAT) != CLASSIFIER_FORMAT:
            raise ExportError(f"{js}: format {meta.get('format')!r}, expected {CLASSIFIER_FORMAT!r}")
        state = load_file(str(st))
        cfg = ClassifierConfig(**meta["config"]) if meta.get("config") else infer_classifier_config(state, meta, js)
        model = cls(cfg)
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or bad:
            raise ExportError(f"{st} does not fit a {cfg.embed_dim}x{cfg.depth} classifier: missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}, other shapes {bad[:3]}")
        model.load_state_dict(state)
        model.export_meta = meta
        return model.eval()

    def _save_folder(self, folder, meta=None):
        """save_pretrained(folder, meta=None) -> model.safetensors (fp32) + meta.json: `meta` over the loaded
        folder's, plus the architecture ("config"), so the folder rebuilds without its encoder export."""
        m = {**(self.export_meta or {}), **(meta or {}), "format": CLASSIFIER_FORMAT, "config": asdict(self.cfg)}
        m.setdefault("num_classes", self.cfg.num_classes)
        m.setdefault("latent_size", self.cfg.latent_size)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        atomic_write_text(folder / "meta.json", json.dumps(m, indent=1))
        return m


def build_classifier(meta, num_classes, latent_size, drop_path=0.0):
    """The classifier shaped as the encoder an export's `meta` describes (exact GELU, as the ViT pretrained)."""
    c = meta["config"]
    if c.get("mlp_act", "gelu") != "gelu":
        raise ValueError(f"the encoder uses mlp_act={c['mlp_act']}; the timm classifier is built with GELU")
    cfg = ClassifierConfig(embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"],
                           num_classes=num_classes, latent_size=latent_size, patch_size=c["patch_size"],
                           in_chans=c["in_chans"], mlp_ratio=c["mlp_ratio"], norm_eps=c["norm_eps"])
    return Classifier(cfg, drop_path=drop_path)
