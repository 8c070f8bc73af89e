"""Hub-style from_pretrained / save_pretrained / push_to_hub (usp_fast.hub, through huggingface_hub's mixin) for the
encoder, DiT/SiT and the classifier: round trips, the stages' own folders, offline behaviour. Nothing here touches
the network: the hub is either switched off (HF_HUB_OFFLINE, sockets refused) or replaced by a local stand-in."""
import json
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import huggingface_hub
from huggingface_hub import constants
from usp_fast.artifacts import ExportError
from usp_fast.cli import main
from usp_fast.hub import HubError
from usp_fast.models.classifier import Classifier, ClassifierConfig
from usp_fast.models.dit import DiT, build_model as build_dit
from usp_fast.models.usp_vit import USPViT, build_model as build_vit
from usp_fast.vae import LatentNorm

REPO = Path(__file__).resolve().parent.parent
OFFLINE_LINE = "is not a local folder and the hub could not be reached (offline: HF_HUB_OFFLINE is set)"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 as huggingface_hub reads it (a constant set at import), an empty HF cache, and no sockets:
    a request attempted anyway fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _randomise(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # DiT starts with zero adaLN and output layers: make every path matter
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _vit():
    return _randomise(build_vit("usp_vit_test", in_chans=4, input_size=8)).eval()


def _dit(family="SiT"):
    return _randomise(build_dit(f"{family}-Test/2", input_size=8, num_classes=5)).eval()


def _classifier():
    return _randomise(Classifier(ClassifierConfig(embed_dim=32, depth=2, num_heads=2, num_classes=5,
                                                      latent_size=8))).eval()


def _dit_inputs():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.3, 0.9]), \
        torch.tensor([1, 5])


# ---- round trips ----
def test_encoder_round_trip_keeps_weights_outputs_and_meta(tmp_path, one_thread):
    vit = _vit()
    out = vit.save_pretrained(tmp_path / "export", "usp_vit_test", resolution=64, step=3,
                              extra_meta={"latent_norm": {"mode": "none"}})
    assert out == tmp_path / "export"
    assert {"encoder.safetensors", "encoder.json", "config.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["cfg"]["embed_dim"] == 32  # the mixin's config
    again, meta = USPViT.from_pretrained(out)
    assert (meta["model"], meta["step"], meta["resolution"]) == ("usp_vit_test", 3, 64) and again.export_meta is meta
    for k, v in vit.encoder_state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(vit.forward_encoder(x), again.forward_encoder(x))
    again.save_pretrained(tmp_path / "copy")  # name, step and extra fields come from the export it was loaded from
    _, meta2 = USPViT.from_pretrained(tmp_path / "copy")
    assert (meta2["model"], meta2["step"], meta2["latent_norm"]) == ("usp_vit_test", 3, {"mode": "none"})


def test_dit_round_trip_keeps_weights_outputs_and_the_ema_choice(tmp_path, one_thread):
    dit, ema = _dit(), _dit()
    _randomise(ema, seed=9)
    dit.save_pretrained(tmp_path / "gen", meta={"step": 11}, ema_state=ema.state_dict())
    x, t, y = _dit_inputs()
    loaded, meta = DiT.from_pretrained(tmp_path / "gen")
    raw, _ = DiT.from_pretrained(tmp_path / "gen", ema=False)
    assert (meta["model"], meta["objective"], meta["step"], meta["config"]) == ("SiT-Test/2", "linear", 11,
                                                                                 dit.config_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), ema(x, t, y)) and torch.equal(raw(x, t, y), dit(x, t, y))
    assert all(torch.equal(v, raw.state_dict()[k]) for k, v in dit.state_dict().items())
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_classifier_round_trip_keeps_weights_and_outputs(tmp_path, one_thread):
    clf = _classifier()
    clf.save_pretrained(tmp_path / "classifier", meta={"step": 4, "class_names": list("abcde")})
    again, meta = Classifier.from_pretrained(tmp_path / "classifier")
    assert meta["config"]["num_heads"] == 2 and meta["class_names"] == list("abcde") and meta["step"] == 4
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in clf.state_dict().items())
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(clf(x), again(x))


def test_a_classifier_folder_written_by_the_finetune_stage_loads(tmp_path, one_thread):
    """runs/<name>/classifier as FinetuneStage.finish writes it (meta.json without the architecture): the heads come
    from the encoder export it names, or from the registry once that export is gone."""
    from usp_fast.models.classifier import build_classifier
    from usp_fast.stages.finetune import FinetuneStage

    vit = _vit()
    enc = vit.save_pretrained(tmp_path / "export", "usp_vit_test")
    _, enc_meta = USPViT.from_pretrained(enc)
    model = _randomise(build_classifier(enc_meta, num_classes=5, latent_size=8)).eval()
    stage = SimpleNamespace(cfg=SimpleNamespace(finetune=SimpleNamespace(encoder=str(enc), val_cache_dir=None)),
                            num_classes=5)
    manifest = {"class_names": list("abcde"), "latent_size": 8, "vae": {"name": "tiny"}}
    FinetuneStage.finish(stage, model, tmp_path, manifest, LatentNorm(), step=2, epoch=1)
    assert "config" not in json.loads((tmp_path / "classifier" / "meta.json").read_text())
    x = torch.randn(3, 4, 8, 8)
    for label in ("encoder export", "registry"):
        loaded, meta = Classifier.from_pretrained(tmp_path / "classifier")
        assert meta["step"] == 2, label
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x)), label
        shutil.rmtree(enc, ignore_errors=True)


# ---- local folders, hub ids, offline ----
def test_local_folders_load_offline_even_when_their_name_is_a_valid_hub_id(tmp_path, monkeypatch, offline,
                                                                           one_thread):
    _vit().save_pretrained(tmp_path / "export", "usp_vit_test")
    _dit().save_pretrained(tmp_path / "generator")
    _classifier().save_pretrained(tmp_path / "classifier")
    monkeypatch.chdir(tmp_path)  # "export" is also a well-formed hub id: the local folder wins
    assert USPViT.from_pretrained("export")[1]["model"] == "usp_vit_test"
    assert USPViT.from_pretrained("export/encoder.safetensors")[1]["model"] == "usp_vit_test"
    assert DiT.from_pretrained("generator")[0].cfg.family == "SiT"
    assert Classifier.from_pretrained("classifier")[0].cfg.num_classes == 5


@pytest.mark.parametrize("cls", ["USPViT", "DiT", "Classifier"])
def test_a_hub_id_offline_is_one_line(offline, cls):
    model_cls = {"USPViT": USPViT, "DiT": DiT, "Classifier": Classifier}[cls]
    with pytest.raises(HubError) as e:
        model_cls.from_pretrained("org/name")
    msg = str(e.value)
    assert msg.startswith("org/name " + OFFLINE_LINE) and "pass a local path" in msg and "\n" not in msg


def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path, offline):
    with pytest.raises(ExportError, match="does not exist: expected an encoder export folder"):
        USPViT.from_pretrained(tmp_path / "nope")


def test_the_cli_prints_the_offline_hub_line_and_exits_2(tmp_path, monkeypatch, capsys, offline):
    from usp_fast import dist

    monkeypatch.setattr(dist, "init", lambda use_deepspeed=True: (0, 1, torch.device("cpu")))  # no process group
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--config", str(REPO / "configs" / "generate" / "demo.yaml"), "sample.checkpoint=org/name",
              f"run.out_dir={tmp_path / 'runs'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"usp-fast sample: error: org/name {OFFLINE_LINE}: download it first (hf download org/name " \
                  "--local-dir DIR) or pass a local path\n"


# ---- the hub plumbing, against a local stand-in for the hub ----
def test_a_hub_id_downloads_config_then_the_export_files(tmp_path, monkeypatch, one_thread):
    dit = _dit()
    dit.save_pretrained(tmp_path / "repo")
    calls = []

    def fake_hf_hub_download(repo_id, filename, **kwargs):  # the mixin reads config.json first
        calls.append(("file", repo_id, filename))
        return str(tmp_path / "repo" / filename)

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append(("snapshot", repo_id, tuple(allow_patterns)))
        return str(tmp_path / "repo")

    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded, meta = DiT.from_pretrained("org/sit", ema=False, revision="v1")
    assert calls == [("file", "org/sit", "config.json"),
                     ("snapshot", "org/sit", ("generator.json", "model.safetensors"))]
    x, t, y = _dit_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), dit(x, t, y))


def test_push_to_hub_uploads_the_project_folder(tmp_path, monkeypatch, one_thread):
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded["repo"] = repo_id
            shutil.copytree(folder_path, tmp_path / "uploaded")
            return f"https://hub/{repo_id}/commit/1"

    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    vit = _vit()
    vit.save_pretrained(tmp_path / "export", "usp_vit_test", step=5, push_to_hub=True, repo_id="org/enc")
    assert uploaded["repo"] == "org/enc"
    _, meta = USPViT.from_pretrained(tmp_path / "uploaded")  # what went up is an export with the same description
    assert (meta["model"], meta["step"]) == ("usp_vit_test", 5)
    assert (tmp_path / "uploaded" / "config.json").is_file() and (tmp_path / "uploaded" / "README.md").is_file()
