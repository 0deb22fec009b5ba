import copy
import json
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import safetensors.torch
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


# ---- local weights in the formats people have -------------------------------------------------------------
# A small arch shaped the way open_clip rebuilds OpenAI's models (64-wide heads), so open_clip's own OpenAI
# loader can serve as the independent reference; registered with and without QuickGELU like ViT-B-16.
SMALL = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 64},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}


@pytest.fixture(scope="module")
def small_archs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    (folder / "clipprune-test.json").write_text(json.dumps(SMALL))
    (folder / "clipprune-test-quickgelu.json").write_text(json.dumps({**SMALL, "quick_gelu": True}))
    open_clip.add_model_config(folder)
    return "clipprune-test", "clipprune-test-quickgelu"


def source_model(arch: str, seed: int = 1):
    """Random weights with a seed of their own, so a loader that kept its fresh init cannot pass."""
    torch.manual_seed(seed)
    model = build_model(arch)[0]
    torch.manual_seed(0)  # the loaded model's own random init starts elsewhere
    return model


def embeddings(model, arch: str):
    size = model.visual.image_size
    x = torch.randn(3, 3, *((size, size) if isinstance(size, int) else size), generator=torch.Generator().manual_seed(5))
    text = open_clip.get_tokenizer(arch)(["a photo of a dog", "a cat", "x"])
    with torch.no_grad():
        return model.encode_image(x), model.encode_text(text)


def assert_same_embeddings(a, b, arch):
    for u, v in zip(embeddings(a, arch), embeddings(b, arch)):
        assert torch.equal(u, v)


def openai_archive(model: torch.nn.Module, path: Path) -> None:
    """Write `model` as OpenAI wrote CLIP: a TorchScript archive of fp16 conv/linear/attention weights (fp32
    norms and embeddings) with input_resolution, context_length and vocab_size stored beside them."""
    from open_clip.model import convert_weights_to_fp16

    model = copy.deepcopy(model)
    convert_weights_to_fp16(model)
    extras = {"input_resolution": model.visual.image_size[0], "context_length": model.context_length,
              "vocab_size": model.vocab_size}
    for key, value in extras.items():
        model.__dict__.pop(key, None)  # plain ints on open_clip's CLIP, tensors in OpenAI's archive
        model.register_buffer(key, torch.tensor(value))
    model.attn_mask = model._buffers.pop("attn_mask")  # OpenAI's causal mask is a plain attribute, not a weight
    torch.jit.script(model).save(str(path))


def write_weights(fmt: str, model: torch.nn.Module, root: Path) -> Path:
    """`model` written as a user's file in format `fmt`; returns what model.pretrained would name."""
    sd = model.state_dict()
    if fmt == "bin":  # open_clip's hub file: a bare state dict
        torch.save(sd, root / "open_clip_pytorch_model.bin")
        return root / "open_clip_pytorch_model.bin"
    if fmt == "pt":
        torch.save(sd, root / "weights.pt")
        return root / "weights.pt"
    if fmt == "train-checkpoint":  # open_clip's training loop under DDP
        torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, root / "epoch_3.pt")
        return root / "epoch_3.pt"
    if fmt == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, root / "model.safetensors")
        return root / "model.safetensors"
    if fmt == "openai":
        openai_archive(model, root / "ViT-B-16.pt")
        return root / "ViT-B-16.pt"
    if fmt == "hf-snapshot":  # what huggingface_hub.snapshot_download leaves for an open_clip repo
        snap = root / "models--timm--clip" / "snapshots" / "abc123"
        snap.mkdir(parents=True)
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, snap / "open_clip_model.safetensors")
        torch.save(sd, snap / "open_clip_pytorch_model.bin")
        (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**SMALL, "quick_gelu": True},
                                                                "preprocess_cfg": {}}))
        return snap
    if fmt == "hf-cache-root":
        return write_weights("hf-snapshot", model, root).parent.parent
    if fmt == "dir-openai":
        (root / "openai").mkdir()
        openai_archive(model, root / "openai" / "ViT-B-16.pt")
        return root / "openai"
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["bin", "pt", "train-checkpoint", "safetensors", "openai", "hf-snapshot",
                                 "hf-cache-root", "dir-openai"])
def test_local_weights_load_exactly(fmt, small_archs, tmp_path, one_thread):
    arch = small_archs[1]
    source = source_model(arch)
    if fmt in ("openai", "dir-openai"):  # OpenAI ships fp16 weights: what they hold is the fp16 rounding
        from open_clip.model import convert_weights_to_fp16

        convert_weights_to_fp16(source)
        source.float()
    path = write_weights(fmt, source, tmp_path)
    loaded = build_model(arch, pretrained=str(path))[0]
    assert_same_embeddings(loaded, source, arch)


def test_openai_archive_reads_as_open_clip_reads_it(small_archs, tmp_path, one_thread):
    """Independent reference: open_clip's own OpenAI loader, on the same archive, gives the same model."""
    arch = small_archs[1]
    openai_archive(source_model(arch), tmp_path / "ViT-B-16.pt")
    ours = build_model(arch, pretrained=str(tmp_path / "ViT-B-16.pt"))[0]
    theirs = open_clip.load_openai_model(str(tmp_path / "ViT-B-16.pt"), precision="fp32", device="cpu")
    assert_same_embeddings(ours, theirs, arch)


def test_quickgelu_refusals(small_archs, tmp_path):
    plain, quick = small_archs
    src = source_model(quick)
    with pytest.raises(ClipPruneError, match=f"OpenAI TorchScript archive.*use arch {quick}$") as e:
        build_model(plain, pretrained=str(write_weights("openai", src, tmp_path)))
    assert "\n" not in str(e.value)
    snap = write_weights("hf-snapshot", src, tmp_path)
    with pytest.raises(ClipPruneError, match=f"open_clip_config.json says quick_gelu=true.*use arch {quick}$"):
        build_model(plain, pretrained=str(snap))
    with pytest.raises(ClipPruneError, match="quick_gelu=true"):  # the file named directly, its config beside it
        build_model(plain, pretrained=str(snap / "open_clip_pytorch_model.bin"))
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL}))
    with pytest.raises(ClipPruneError, match=f"quick_gelu=false.*use an arch without QuickGELU .*{plain}\\)$"):
        build_model(quick, pretrained=str(snap))


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "openai"])
def test_weights_of_another_arch_are_one_line(fmt, small_archs, tiny, tmp_path):
    path = write_weights(fmt, tiny[0], tmp_path)  # clipprune-tiny's weights
    with pytest.raises(ClipPruneError, match=f"weights {path} do not fit arch {small_archs[1]}: keys .*of another "
                                             r"shape \(e\.g\. .*: \(") as e:
        build_model(small_archs[1], pretrained=str(path))
    assert "\n" not in str(e.value)


def test_unusable_weight_files_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "two").mkdir()
    for name in ("a.pt", "b.pt"):
        torch.save({}, tmp_path / "two" / name)
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for path, message in [("empty", "holds no weights file"), ("two", r"several \.pt files \(a\.pt, b\.pt\)"),
                          ("junk.bin", "cannot read checkpoint .*junk.bin"), ("tensor.pt", "holds no state dict")]:
        with pytest.raises(ClipPruneError, match=message) as e:
            build_model("clipprune-tiny", pretrained=str(tmp_path / path))
        assert "\n" not in str(e.value)


def test_pretrain_stage_saves_local_weights(tmp_path):
    """model.pretrained naming a HF-style folder: the pretrain stage writes exactly those weights to models/clip.pt."""
    import subprocess
    import sys

    import yaml

    from clipprune.model import load_checkpoint

    source = source_model("clipprune-tiny")
    (tmp_path / "hub").mkdir()
    write_weights("bin", source, tmp_path / "hub")
    root = Path(__file__).resolve().parent.parent
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["pretrained"] = str(tmp_path / "hub")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run([sys.executable, "-m", "stages.pretrain"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    saved = load_checkpoint(tmp_path / "models" / "clip.pt", arch="clipprune-tiny")
    assert saved.keys() == source.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in source.state_dict().items())


def test_vit_b16_quickgelu_bin(tmp_path, one_thread):
    """The paper's arch from an open_clip hub file (random weights)."""
    arch = "ViT-B-16-quickgelu"
    source = source_model(arch)
    path = write_weights("bin", source, tmp_path)
    loaded = build_model(arch, pretrained=str(path))[0]
    assert_same_embeddings(loaded, source, arch)
