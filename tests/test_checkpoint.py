from __future__ import annotations

import io
import json

import pytest
import safetensors.torch
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

import detgraft
from conftest import TINY_BUILDER, assert_same_detections, detect
from detgraft.model.builders import read_state_dict, weights_cache_path
from detgraft.model.card import coco_names
from tiny_model import build, images

TINY_NAMES = ["__background__", "person", "bird", "N/A", "cup", "laptop"]


@pytest.fixture
def tiny_weights(tmp_path):
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(build().state_dict(), str(path))
    return path


def _equal_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_python_builder_round_trip_is_exact(tmp_path, tiny_weights):
    model = detgraft.load_model(TINY_BUILDER, tiny_weights, TINY_NAMES)
    assert _equal_state(model, build())
    detgraft.expand_predictor(model, ["chicken", "frog"], init="mean")
    detgraft.save_checkpoint(model, tmp_path / "ckpt")
    loaded = detgraft.load_model(tmp_path / "ckpt")
    assert _equal_state(model, loaded)
    assert_same_detections(detect(model, images()), detect(loaded, images()), score_rtol=0)
    card = detgraft.get_card(loaded)
    assert card.classes == TINY_NAMES + ["chicken", "frog"]
    assert card.history[0]["added"] == ["chicken", "frog"] and card.history[0]["init"] == "mean"
    assert card.old_labels == [1, 2, 4, 5] and card.new_labels == [6, 7]


def test_torchvision_checkpoint_loads_with_torchvision_alone(tmp_path):
    weights = tmp_path / "mobilenet.pth"
    torch.save(
        torchvision.models.get_model(
            "fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, weights_backbone=None
        ).state_dict(),
        weights,
    )
    model = detgraft.load_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights)
    detgraft.expand_predictor(model, ["chicken", "frog"])
    detgraft.save_checkpoint(model, tmp_path / "ckpt")

    # the three lines of the README, nothing from detgraft
    meta = json.load(open(tmp_path / "ckpt" / "detgraft.json"))
    plain = torchvision.models.get_model(meta["builder"]["name"], **meta["builder"]["kwargs"])
    plain.load_state_dict(safetensors.torch.load_file(str(tmp_path / "ckpt" / "model.safetensors")))

    assert plain.roi_heads.box_predictor.cls_score.out_features == 93
    assert _equal_state(model, plain)
    assert meta["classes"][91:] == ["chicken", "frog"]


def test_coco_weights_missing_offline_give_the_file_and_the_folder(tmp_path, monkeypatch):
    import urllib.error

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as err:
        detgraft.load_model("fasterrcnn_resnet50_fpn", "DEFAULT")
    assert "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth" in str(err.value)
    assert str(tmp_path / "hub" / "checkpoints") in str(err.value) and "name resolution" in str(err.value)


MOBILE = "fasterrcnn_mobilenet_v3_large_320_fpn"


def test_named_weights_download_as_torchvision_s_do(tmp_path, monkeypatch):
    """Into torch's hub cache, with a progress bar and torchvision's hash check; the weights enum
    and its text are accepted as well as "COCO_V1"."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.get_model(MOBILE, weights=None, weights_backbone=None)
    enum = torchvision.models.get_model_weights(MOBILE)
    fetched = []

    def fetch(url, dst, hash_prefix=None, progress=True):
        fetched.append((url, hash_prefix, progress))
        torch.save(reference.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fetch)
    for weights in (enum.COCO_V1, f"{enum.__name__}.COCO_V1", "COCO_V1"):
        model = detgraft.load_model(MOBILE, weights)
        assert detgraft.get_card(model).source == str(enum.COCO_V1)
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert fetched == [(enum.COCO_V1.url, "907ea3f9", True)]  # once, with the hash check; then from the cache
    assert weights_cache_path(enum.COCO_V1).is_file()
    other = torchvision.models.get_model_weights("fasterrcnn_resnet50_fpn").COCO_V1
    with pytest.raises(ValueError, match="are not weights of fasterrcnn_mobilenet_v3_large_320_fpn"):
        detgraft.load_model(MOBILE, other)


def test_a_download_that_fails_torchvision_s_hash_check_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    payload = b"not the weights"

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

        def info(self):
            return self

        def get_all(self, name):
            return [str(len(payload))] if name == "Content-Length" else None

    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: Response(payload))
    with pytest.raises(ValueError, match="invalid hash value"):
        detgraft.load_model(MOBILE, "COCO_V1")
    assert not weights_cache_path(torchvision.models.get_model_weights(MOBILE).COCO_V1).exists()


def test_coco_weights_are_read_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.get_model(
        "fasterrcnn_mobilenet_v3_large_320_fpn", weights=None, weights_backbone=None
    )
    enum = torchvision.models.get_model_weights("fasterrcnn_mobilenet_v3_large_320_fpn")
    cached = weights_cache_path(enum.COCO_V1)
    assert cached.parent == tmp_path / "hub" / "checkpoints"
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)  # a local file at the name torchvision's cache uses
    model = detgraft.load_model("fasterrcnn_mobilenet_v3_large_320_fpn", "COCO_V1")
    state, expected = model.state_dict(), reference.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    card = detgraft.get_card(model)
    assert card.classes == coco_names() and "COCO_V1" in card.source

    # pretrained torchvision models have frozen BatchNorm and frozen early layers: a checkpoint keeps both
    detgraft.expand_predictor(model, ["chicken"])
    detgraft.save_checkpoint(model, tmp_path / "ckpt")
    loaded = detgraft.load_checkpoint(tmp_path / "ckpt")
    assert _equal_state(model, loaded)
    kinds = [type(m) for m in model.modules()]
    assert kinds == [type(m) for m in loaded.modules()] and FrozenBatchNorm2d in kinds
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in loaded.parameters()]
    assert not all(p.requires_grad for p in loaded.parameters())


def test_pickled_model_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save({"model": build(), "categories": TINY_NAMES}, path)
    with pytest.raises(ValueError, match="refusing to unpickle .*--trust-pickle"):
        detgraft.load_model(path)
    with pytest.raises(ValueError, match="refusing to read .*pickled Python objects"):
        read_state_dict(path)
    model = detgraft.load_model(path, trust_pickle=True)
    assert _equal_state(model, build()) and detgraft.get_card(model).classes == TINY_NAMES
    with pytest.raises(ValueError, match="does not know which builder"):
        detgraft.save_checkpoint(model, tmp_path / "ckpt")


def test_state_dict_given_as_model_asks_for_the_builder(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(build().state_dict(), path)
    with pytest.raises(ValueError, match="holds tensors, not a model"):
        detgraft.load_model(path)


@pytest.mark.parametrize(
    "model, weights, classes, error, match",
    [
        ("yolov8n", None, None, ValueError, "cannot load 'yolov8n'"),
        (TINY_BUILDER, "missing.safetensors", None, FileNotFoundError, "does not exist"),
        # classes list must cover every output
        (TINY_BUILDER, None, ["__background__", "a"], ValueError, "list 2 labels but the model has 6"),
        # weights of another architecture
        ("fasterrcnn_mobilenet_v3_large_320_fpn", "TINY", None, ValueError, "not a FasterRCNN state dict|does not fit"),
    ],
)
def test_load_model_errors(tiny_weights, model, weights, classes, error, match):
    weights = tiny_weights if weights == "TINY" else weights
    with pytest.raises(error, match=match):
        detgraft.load_model(model, weights, classes)


def test_interrupted_or_altered_checkpoint_is_refused(tmp_path, tiny_weights):
    model = detgraft.load_model(TINY_BUILDER, tiny_weights)
    detgraft.save_checkpoint(model, tmp_path / "ckpt")
    assert not list((tmp_path / "ckpt").glob(".*.tmp"))
    other = build(seed=5)
    safetensors.torch.save_file(other.state_dict(), str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(ValueError, match="does not match detgraft.json"):
        detgraft.load_checkpoint(tmp_path / "ckpt")


def test_classes_from_coco_categories(tmp_path, tiny_weights):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps({"categories": [{"id": 1, "name": "person"}, {"id": 5, "name": "cup"}]}))
    model = detgraft.load_model(TINY_BUILDER, tiny_weights, path)
    assert detgraft.get_card(model).classes == ["__background__", "person", "N/A", "N/A", "N/A", "cup"]
