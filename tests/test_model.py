import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipprune import synth
from clipprune.errors import ClipPruneError
from clipprune.model import build_model, images_to_input, save_checkpoint


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("clipprune-tiny")


@pytest.fixture(scope="module")
def batch():
    return synth.generate(8, seed=0, split="train")


def test_tiny_config_is_registered():
    assert "clipprune-tiny" in open_clip.list_models()
    cfg = open_clip.get_model_config("clipprune-tiny")["vision_cfg"]
    assert (cfg["image_size"], cfg["patch_size"]) == (64, 8) and cfg["layers"] >= 4


def test_tiny_encodes_images_and_text(tiny, batch):
    model, preprocess, tokenizer = tiny
    assert not model.training
    texts = tokenizer(batch["captions"])
    # every caption fits in the context with room for the end token, so none is truncated
    assert (texts != 0).sum(dim=1).max() < texts.shape[1]
    with torch.no_grad():
        img = model.encode_image(images_to_input(batch["images"], model))
        txt = model.encode_text(texts)
    assert img.shape == (8, 64) and txt.shape == (8, 64)
    assert model.visual.grid_size == (8, 8)


def test_batched_input_matches_open_clip_preprocess(tiny, batch):
    model, preprocess, _ = tiny
    ref = torch.stack([preprocess(Image.fromarray(im)) for im in batch["images"]])
    assert torch.allclose(images_to_input(batch["images"], model), ref, atol=1e-6)
    with pytest.raises(ValueError, match="preprocess"):
        images_to_input(np.zeros((1, 32, 32, 3), dtype=np.uint8), model)


def test_checkpoint_round_trip(tiny, batch, tmp_path):
    model, _, tokenizer = tiny
    path = tmp_path / "clip.pt"
    save_checkpoint(model, path, arch="clipprune-tiny")
    loaded, _, _ = build_model("clipprune-tiny", pretrained=str(path))
    x, t = images_to_input(batch["images"], model), tokenizer(batch["captions"])
    with torch.no_grad():
        for a, b in zip(model(x, t), loaded(x, t)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="arch"):
        build_model("ViT-B-32", pretrained=str(path))
    with pytest.raises(ClipPruneError, match="missing.pt"):
        build_model("clipprune-tiny", pretrained=str(tmp_path / "missing.pt"))


def test_unknown_arch_message():
    with pytest.raises(ValueError, match=r"unknown arch 'ViT-Nope'.*list_models") as e:
        build_model("ViT-Nope")
    assert "\n" not in str(e.value)


def test_openai_weights_need_quickgelu():
    with pytest.raises(ClipPruneError, match="use arch ViT-B-16-quickgelu"):
        build_model("ViT-B-16", pretrained="openai")


def test_offline_named_tag_is_one_line_within_seconds(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ClipPruneError, match="cannot get weights ViT-B-32-quickgelu/openai") as e:
        build_model("ViT-B-32-quickgelu", pretrained="openai")
    assert "\n" not in str(e.value) and time.perf_counter() - t0 < 30
