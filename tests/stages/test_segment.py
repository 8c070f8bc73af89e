"""--stage segment: the paired augmentation, the neck's strides, sliding-window inference, mIoU against an
independent count, exact resume, the USP init, the view cache, one-line errors; on a tiny mosaic set made from
scikit-image's photographs (no ../shared) with the weight-free pixels:4 'VAE'."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_exit_2
from usp_fast.data.mosaic import make_mosaic_set
from usp_fast.data.segmentation import IGNORE, list_pairs, load_mask, paired_view, view_rng
from usp_fast.engine import Trainer
from usp_fast.metrics.segmentation import SegmentationScore
from usp_fast.models.segmenter import Segmenter, segmenter_config, slide_logits, window_starts
from usp_fast.models.usp_vit import MODELS
from usp_fast.optim import schedule_lr
from usp_fast.stages import load_config
from usp_fast.stages.segment import SegmentStage


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
    return make_mosaic_set(tmp_path_factory.mktemp("mosaics") / "set", None, num_train=8, num_val=3, size=64)


def seg_cfg(tmp_path, root, *extra):
    base = [f"run.out_dir={tmp_path / 'runs'}", "run.name=s", f"data.root={root}", "data.resolution=32",
            "data.num_workers=0", "vae.name=pixels:4", "vae.scale=1.0", "model.name=usp_vit_test",
            "segment.img_scale=[128,64]", "segment.head_channels=16", "segment.aux_channels=8",
            "segment.eval_stride=16", "segment.pictures=2", "optim.lr=1e-3", "optim.warmup_steps=1",
            "optim.schedule=poly", "train.epochs=1000", "train.max_steps=4", "train.global_batch=4",
            "train.micro_batch=2", "train.log_every=1", "train.ckpt_every=1000", "train.zero_stage=0"]
    return load_config(None, base + list(extra), stage="segment")


def rows(cfg):
    path = Path(cfg.run.out_dir) / cfg.run.name / "metrics.jsonl"
    return [json.loads(r) for r in path.read_text().splitlines()]


# ---- the metric ----
def reference_scores(pred, truth, n):
    """mmseg's definitions, counted pixel by pixel in plain numpy: IoU per class over the pixels not ignored,
    undefined (None) where a class is in neither; mIoU the mean of the defined ones; aAcc correct / labelled."""
    keep = truth != IGNORE
    p, t = pred[keep], truth[keep]
    ious = []
    for c in range(n):
        inter, union = np.sum((p == c) & (t == c)), np.sum((p == c) | (t == c))
        ious.append(None if union == 0 else inter / union)
    defined = [v for v in ious if v is not None]
    return 100 * np.mean(defined), ious, 100 * np.mean(p == t)


def test_miou_matches_an_independent_count_with_ignored_pixels_and_absent_classes():
    n = 5  # class 4 appears nowhere; class 3 only under ignored pixels of the truth
    truth = np.array([[0, 0, 1, 1], [0, 2, 2, IGNORE], [IGNORE, IGNORE, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 3], [3, 3, 1, 2]])
    miou, ious, aacc = reference_scores(pred, truth, n)
    score = SegmentationScore(n)
    # two updates (as two images): the matrix accumulates, it does not average per image
    score.update(torch.from_numpy(pred[:1]), torch.from_numpy(truth[:1]))
    score.update(torch.from_numpy(pred[1:]), torch.from_numpy(truth[1:]))
    got = score.compute([f"c{k}" for k in range(n)])
    assert got["mIoU"] == pytest.approx(miou) and got["aAcc"] == pytest.approx(aacc)
    for k in range(n):
        want = ious[k]
        assert (got["per_class"][f"c{k}"]["iou"] is None) == (want is None)
        if want is not None:
            assert got["per_class"][f"c{k}"]["iou"] == pytest.approx(100 * want)
    assert got["classes_present"] == 3 and got["pixels"] == 9
    # by hand: class 0: 2 / 4, class 1: 3 / 5, class 2: 1 / 3 (3 and 4 undefined) -> mIoU 47.78; aAcc 6 / 9
    assert got["mIoU"] == pytest.approx(100 * (0.5 + 0.6 + 1 / 3) / 3) and got["aAcc"] == pytest.approx(600 / 9)


# ---- the data ----
def test_the_paired_view_keeps_image_and_mask_aligned():
    """The mask is a function of the image (each class a flat colour): after random resizes, crops and flips the
    mask read back from the augmented image must still be the augmented mask."""
    colours = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10]], dtype=np.uint8)
    blocks = np.random.default_rng(3).integers(0, 4, (3, 5))
    mask = np.kron(blocks, np.ones((24, 24), dtype=np.int64)).astype(np.uint8)  # 72 x 120, asymmetric
    image = Image.fromarray(colours[mask])
    for index in range(12):
        img, m = paired_view(image, mask, view_rng(0, 0, index), 48, (200, 60), (0.5, 2.0), cat_max_ratio=1.0)
        assert img.shape == (48, 48, 3) and m.shape == (48, 48)
        assert set(np.unique(m)) <= {0, 1, 2, 3, IGNORE}  # nearest only: no value is ever blended
        labelled = m != IGNORE
        read_back = np.abs(img[:, :, None].astype(int) - colours[None, None].astype(int)).sum(-1).argmin(-1)
        # bilinear blends colours only at block edges: everywhere else the image says the mask's class
        assert np.mean(read_back[labelled] == m[labelled]) > 0.9, index
        assert (img[~labelled] == 0).all()  # padding: black image, ignored mask
    again = paired_view(image, mask, view_rng(0, 0, 5), 48, (200, 60), (0.5, 2.0))
    first = paired_view(image, mask, view_rng(0, 0, 5), 48, (200, 60), (0.5, 2.0))
    assert np.array_equal(again[0], first[0]) and np.array_equal(again[1], first[1])  # a pure function of the draw


def test_a_mirror_only_view_is_the_flipped_image_and_mask():
    mask = np.tile(np.arange(8, dtype=np.uint8), (8, 1))  # columns 0..7: a flip reverses them
    image = Image.fromarray(np.stack([mask * 30] * 3, -1))
    seen = set()
    for index in range(8):  # scale 1 (img_scale = the image, ratio 1), crop = the image: only the flip varies
        img, m = paired_view(image, mask, view_rng(1, 0, index), 8, (8, 8), (1.0, 1.0))
        assert np.array_equal(img[..., 0] // 30, m)
        seen.add(int(m[0, 0]))
    assert seen == {0, 7}


def test_masks_follow_reduce_zero_label_and_bad_values_are_refused(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(np.array([[0, 1], [3, 2]], dtype=np.uint8), mode="L").save(path)
    assert load_mask(path, 3).tolist() == [[IGNORE, 0], [2, 1]]
    with pytest.raises(ValueError, match=r"m.png: mask value 3 is above segment.num_classes 2"):
        load_mask(path, 2)


def test_the_mosaic_set_is_labelled_from_its_photos(mosaics):
    pairs = list_pairs(mosaics, "training")
    assert len(pairs) == 8 and len(list_pairs(mosaics, "validation")) == 3
    names = (mosaics / "classes.txt").read_text().split()
    mask = np.asarray(Image.open(pairs[0][1]))
    assert 0 < np.mean(mask == 0) < 0.15 and mask.max() <= len(names)  # a thin ignored seam, labels 1..N
    assert len(np.unique(mask[mask > 0])) >= 1


# ---- the model ----
@pytest.mark.parametrize("downsample, latent_hw", [(8, (16, 16)), (8, (16, 24)), (4, (32, 32))])
def test_the_neck_makes_strides_4_8_16_32_of_the_token_stride(downsample, latent_hw):
    cfg = segmenter_config({**MODELS["usp_vit_test"], "in_chans": 6}, 3, 16, downsample, head_channels=8,
                           aux_channels=8)
    model = Segmenter(cfg).eval()
    z = torch.randn(2, 6, *latent_hw)
    levels = model.pyramid(z)
    image_hw = (latent_hw[0] * downsample, latent_hw[1] * downsample)
    strides = [(image_hw[0] // f.shape[-2], image_hw[1] // f.shape[-1]) for f in levels]
    t = 2 * downsample  # patch 2 x the VAE's downsampling
    assert strides == [(t // 4,) * 2, (t // 2,) * 2, (t,) * 2, (2 * t,) * 2]
    main, aux = model(z)
    assert main.shape[-2:] == levels[0].shape[-2:] and aux.shape[-2:] == levels[2].shape[-2:]
    assert model.logits(z).shape == (2, 3, *image_hw)


def test_sliding_windows_that_cover_the_image_are_whole_image_inference():
    torch.manual_seed(0)
    cfg = segmenter_config({**MODELS["usp_vit_test"], "in_chans": 6}, 4, 8, 8, head_channels=8, aux_channels=8)
    model = Segmenter(cfg).eval()
    z = torch.randn(1, 6, 12, 16)
    whole = model.logits(z)
    for crop, stride in ((16, 4), (24, 8)):  # one window covering the image (or more)
        torch.testing.assert_close(slide_logits(model, z, crop, stride), whole, rtol=0, atol=0)
    tiled = slide_logits(model, z, 8, 4)  # overlapping windows: a different, finite average over the canvas
    assert tiled.shape == whole.shape and torch.isfinite(tiled).all() and not torch.allclose(tiled, whole)
    assert window_starts(12, 8, 4) == [0, 4] and window_starts(16, 8, 6) == [0, 6, 8]
    assert window_starts(4, 8, 4) == [0]


def test_poly_schedule_after_warm_up():
    assert schedule_lr(2, 1.0, 4, 14, schedule="poly") == 0.5
    assert schedule_lr(4, 1.0, 4, 14, schedule="poly") == 1.0
    assert schedule_lr(9, 1.0, 4, 14, schedule="poly") == pytest.approx(0.5)
    assert schedule_lr(9, 1.0, 4, 14, 0.1, "poly", 2.0) == pytest.approx(0.1 + 0.9 * 0.25)


# ---- the stage ----
def test_segment_trains_evaluates_and_exports(tmp_path, mosaics, one_thread):
    cfg = seg_cfg(tmp_path, mosaics)
    result = SegmentStage(cfg).run()
    rdir = Path(cfg.run.out_dir) / cfg.run.name
    report = json.loads((rdir / "segment.json").read_text())
    assert report["mIoU"] == result["mIoU"] and 0 <= report["mIoU"] <= 100 and report["images"] == 3
    names = (mosaics / "classes.txt").read_text().split()
    assert list(report["per_class"]) == names and report["inference"]["mode"] == "slide"
    assert (rdir / "segment_val.png").is_file() and (rdir / "loss.png").is_file()
    model, meta = Segmenter.from_folder(rdir / "segmenter")
    assert meta["class_names"] == names and model.cfg.num_classes == len(names)
    assert {"loss_main", "loss_aux"} <= set(rows(cfg)[-1])


def test_segment_resume_is_exact(tmp_path, mosaics, one_thread):
    full = seg_cfg(tmp_path, mosaics, "run.name=full", "segment.eval_images=1")
    SegmentStage(full).run()
    part = seg_cfg(tmp_path, mosaics, "run.name=part", "train.run_steps=2", "train.ckpt_every=2",
                   "segment.eval_images=1")
    assert SegmentStage(part).run() == {"stopped_at": 2}
    resumed = seg_cfg(tmp_path, mosaics, "run.name=part", "train.ckpt_every=2", "segment.eval_images=1")
    SegmentStage(resumed).run(resume="auto", allow_config_change=True)  # (only the checkpoint cadence differs)
    assert [(r["step"], r["loss"]) for r in rows(resumed)] == [(r["step"], r["loss"]) for r in rows(full)]
    assert len(rows(full)) == 4


def test_usp_init_copies_the_encoder_and_the_view_cache_is_reused(tmp_path, mosaics, one_thread):
    from usp_fast.artifacts import save_encoder
    from usp_fast.models.usp_vit import build_model
    from usp_fast.vae import load_vae

    torch.manual_seed(1)
    encoder = build_model("usp_vit_test", in_chans=48, input_size=8)  # pixels:4 at 32 px: 48 x 8 x 8 latents
    export = save_encoder(encoder, tmp_path / "export", "usp_vit_test", load_vae("pixels:4", 1.0).identity, 32)
    cfg = seg_cfg(tmp_path, mosaics, f"segment.init=usp:{export}", "segment.views=2",
                  f"segment.cache_dir={tmp_path / 'views'}", "train.max_steps=1", "segment.eval_images=1")
    trainer = Trainer(cfg, SegmentStage(cfg))
    vit = trainer.engine.module.backbone
    assert torch.equal(vit.blocks[1].attn.qkv.weight, encoder.blocks[1].attn.qkv.weight)
    assert torch.equal(vit.pos_embed, encoder.pos_embed)  # cls row kept, same 4x4 grid
    manifest = json.loads((tmp_path / "views" / "manifest.json").read_text())
    assert manifest["views"] == 2 and np.load(tmp_path / "views" / "masks.npy").shape == (8, 2, 32, 32)
    trainer.close()
    stamp = (tmp_path / "views" / "latents.npy").stat().st_mtime_ns
    again = seg_cfg(tmp_path, mosaics, f"segment.init=usp:{export}", "segment.views=2", "run.name=s2",
                    f"segment.cache_dir={tmp_path / 'views'}", "train.max_steps=1", "segment.eval_images=1")
    assert SegmentStage(again).run()["mIoU"] is not None
    assert (tmp_path / "views" / "latents.npy").stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = seg_cfg(tmp_path, mosaics, "segment.views=2", "segment.cat_max_ratio=0.5", "run.name=s3",
                    f"segment.cache_dir={tmp_path / 'views'}")
    with pytest.raises(ValueError, match="built with other settings .*view"):
        SegmentStage(other).run()


# ---- bad input: one line, exit 2 ----
DEMO = Path(__file__).resolve().parents[2] / "configs" / "segment" / "demo.yaml"


def broken_copy(src, dst, damage):
    import shutil

    shutil.copytree(src, dst)
    damage(dst)
    return dst


@pytest.mark.parametrize("damage, expected", [
    (lambda d: __import__("shutil").rmtree(d / "annotations" / "training"), r"annotations/training is missing"),
    (lambda d: (d / "annotations" / "training" / "mosaic_00003.png").unlink(),
     r"mosaic_00003.jpg: no mask .*mosaic_00003.png"),
    (lambda d: Image.fromarray(np.full((64, 64), 40, np.uint8), mode="L").save(
        d / "annotations" / "training" / "mosaic_00000.png"), r"mosaic_00000.png: mask value 40 is above"),
])
def test_bad_data_is_one_line_naming_the_file(tmp_path, capsys, mosaics, damage, expected):
    root = broken_copy(mosaics, tmp_path / "broken", damage)
    args = [f"{o}" for o in (f"run.out_dir={tmp_path / 'runs'}", f"data.root={root}", "data.resolution=32",
                             "vae.name=pixels:4", "model.name=usp_vit_test", "train.global_batch=4",
                             "train.micro_batch=2", "train.max_steps=8", "segment.views=1", "segment.demo_images=0",
                             f"segment.cache_dir={tmp_path / 'v'}")]
    line = one_line_exit_2(capsys, ["train", "--stage", "segment", "--config", str(DEMO), *args])
    assert __import__("re").search(expected, line), line


def test_a_wrong_init_path_is_one_line(tmp_path, capsys, mosaics):
    line = one_line_exit_2(capsys, ["train", "--stage", "segment", "--config", str(DEMO), f"data.root={mosaics}",
                                    "segment.demo_images=0", f"segment.init=usp:{tmp_path / 'nope'}"])
    assert "segment.init" in line and "nope" in line and "no encoder.json" in line


def test_the_paper_configs_validate():
    root = DEMO.parent
    for name, depth, indices in (("ade20k_vit_b", 12, [3, 5, 7, 11]), ("ade20k_vit_l", 24, [7, 11, 15, 23])):
        cfg = load_config(root / f"{name}.yaml", stage="segment")
        assert cfg.segment.num_classes == 150 and cfg.data.resolution == 512 and cfg.train.global_batch == 16
        assert cfg.train.max_steps == 160_000 and cfg.optim.schedule == "poly" and cfg.optim.warmup_steps == 1500
        assert cfg.segment.out_indices == indices and MODELS[cfg.model.name]["depth"] == depth
    demo = load_config(root / "demo.yaml", stage="segment")
    assert demo.segment.demo_images > 0 and demo.vae.name == "pixels:8"
