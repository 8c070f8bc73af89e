"""The one-home helpers: seeds (pinned: resume and bitwise tests depend on them), parameter groups, pictures."""
import numpy as np
import pytest
import torch
from PIL import Image

from usp_fast import seeding
from usp_fast.optim import decay_groups, schedule_lr
from usp_fast.pictures import image_grid, save_png, to_uint8


def test_seed_derivations_keep_their_numbers():
    assert seeding.step_seed(3, 7, 1, 2) == int(
        np.random.SeedSequence([3, 7, 1, 2]).generate_state(1, np.uint64)[0] >> 1)
    assert seeding.sample_batch_seed(5, 4) == seeding.step_seed(5, 4, 0, 0)
    assert seeding.view_rng(1, 2, 3).integers(0, 2**31) == np.random.default_rng([1, 2, 3, 0x5EED]).integers(0, 2**31)
    assert seeding.epoch_rng(1, 2).permutation(10).tolist() == np.random.default_rng([1, 2]).permutation(10).tolist()
    assert seeding.randaug_seed(1, 2, 3) == int(np.random.SeedSequence([1, 2, 3, 0xA06]).generate_state(1)[0])
    assert seeding.probe_noise_seed(2, 5) == 2 * 1_000_003 + 5
    state = np.random.get_state()[1].copy()
    with seeding.seeded_global_rngs(123):
        a = np.random.rand()
    with seeding.seeded_global_rngs(123):
        assert np.random.rand() == a
    assert (np.random.get_state()[1] == state).all()  # restored


@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
def test_decay_groups_are_the_hand_written_rule(weight_decay):
    from usp_fast.models.usp_vit import build_model

    model = build_model("usp_vit_test", input_size=8)
    decay, no_decay = decay_groups(model, weight_decay)
    want_no = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))]
    want = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in want_no)]
    assert [id(p) for p in decay["params"]] == [id(p) for p in want]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in want_no]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (weight_decay, 0.0)


def test_schedule_lr():
    assert schedule_lr(0, 2.0, 4, 10) == 0.0 and schedule_lr(2, 2.0, 4, 10) == 1.0
    assert schedule_lr(7, 2.0, 4, 10, 0.5) == pytest.approx(1.25)
    assert schedule_lr(9, 2.0, 4, 10, schedule="constant") == 2.0
    assert schedule_lr(3, 2.0, 0, 10, schedule="constant") == 2.0
    with pytest.raises(ValueError, match="schedule"):
        schedule_lr(5, 1.0, 4, 10, schedule="step")


def test_to_uint8_is_adm_rounding():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    x = u.float() / 127.5 - 1
    assert (to_uint8(x) == u.permute(0, 2, 3, 1).numpy()).all()  # exact round trip of the loader's scaling
    assert to_uint8(torch.tensor([-2.0, 2.0]).reshape(1, 1, 1, 2).expand(1, 3, 1, 2))[0, 0].tolist() == [[0] * 3,
                                                                                                          [255] * 3]


def test_grid_layout_labels_and_atomic_png(tmp_path):
    imgs = np.stack([np.full((4, 5, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    g = image_grid(imgs, cols=2, gap=1, background=255)
    assert g.shape == (3 * 4 + 2, 2 * 5 + 1, 3)
    assert (g[5:9, 6:11] == 40).all() and (g[10:, 6:] == 255).all() and (g[4] == 255).all()
    assert image_grid(imgs).shape == (2 * 4, 3 * 5, 3)  # ceil(sqrt(5)) columns, no gap
    labelled = image_grid(np.zeros((4, 16, 16, 3), np.uint8), cols=2, row_labels=["cat", "a longer label"])
    left = labelled.shape[1] - 32
    assert labelled.shape[0] == 32 and left > 0
    assert labelled[:16, :left].max() > 128 and labelled[16:, :left].max() > 128  # text drawn in each row
    assert (labelled[:, left:] == 0).all()  # the images are untouched
    with pytest.raises(ValueError, match="row labels"):
        image_grid(imgs, cols=2, row_labels=["one"])
    out = save_png(g, tmp_path / "sub" / "grid.png")
    assert (np.asarray(Image.open(out)) == g).all() and sorted(p.name for p in out.parent.iterdir()) == ["grid.png"]
