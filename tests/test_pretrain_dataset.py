"""Pretraining on a labelled dataset (the CIFAR-10 profile's path), and the synthetic path left as it was."""
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from clipprune import config, synth
from clipprune.errors import ClipPruneError
from clipprune.model import build_model, images_to_input, load_checkpoint
from clipprune.pretrain import dataset_train_data, pretrain, square_pixels, template_captions
from conftest import run_every_stage
from test_data import make_wds

ROOT = Path(__file__).resolve().parent.parent
TRAIN_LABELS = [0, 1, 2] * 8  # 24 images
TEST_LABELS = [2, 1, 0, 0, 1, 2, 1, 0]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}."]  # what make_wds writes


@pytest.fixture(scope="module")
def wds_root(tmp_path_factory):
    return make_wds(tmp_path_factory.mktemp("wds") / "tiny", labels={"train": TRAIN_LABELS, "test": TEST_LABELS})


def test_template_captions_fill_a_seeded_template_with_the_class_name():
    classnames, labels = ["cat", "dog", "fish"], [0, 1, 2, 2, 1, 0] * 10
    templates = ["a photo of a {c}.", "a blurry photo of the {c}.", "art of the {c}."]
    caps = template_captions(labels, classnames, templates, seed=3)
    assert caps.shape == (len(labels),)
    for cap, y in zip(caps, labels):
        assert cap in [t.replace("{c}", classnames[y]) for t in templates]
    assert len(set(caps)) > len(classnames)  # more than one template is used
    assert list(caps) == list(template_captions(labels, classnames, templates, seed=3))  # deterministic
    assert list(caps) != list(template_captions(labels, classnames, templates, seed=4))
    pick = np.random.default_rng(3).integers(0, len(templates), size=len(labels))  # the documented draw
    assert list(caps) == [templates[t].replace("{c}", classnames[y]) for t, y in zip(pick, labels)]
    with pytest.raises(ClipPruneError, match="labels span"):
        template_captions([0, 3], classnames, templates, seed=0)
    with pytest.raises(ClipPruneError, match="no zero-shot templates"):
        template_captions([0], classnames, [], seed=0)


@pytest.mark.parametrize("size", [(32, 32), (40, 24), (64, 64)])
def test_square_pixels_are_what_the_pipeline_preprocess_sees(size):
    """Training pixels through images_to_input equal open_clip's eval preprocess (resize, crop, normalise)."""
    model, preprocess, _ = build_model("clipprune-tiny")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    px = square_pixels(64)(img)
    assert px.shape == (64, 64, 3) and px.dtype == np.uint8
    assert torch.equal(images_to_input(px[None], model), preprocess(img)[None])


def test_dataset_train_data_reads_caps_and_captions(wds_root):
    data = dataset_train_data("wds/tiny", root=wds_root, pixels=square_pixels(64), n_train=20, n_test=6, seed=1)
    assert data.images.shape == (20, 64, 64, 3) and data.images.dtype == np.uint8
    assert data.test_images.shape == (6, 64, 64, 3)
    assert data.test_labels["wds/tiny"].tolist() == TEST_LABELS[:6]  # the first n_test, in file order
    assert data.tasks == {"wds/tiny": {"classnames": ["cat", "dog", "fish"], "templates": TEMPLATES}}
    expected = template_captions(TRAIN_LABELS[:20], ["cat", "dog", "fish"], TEMPLATES, seed=1)
    assert list(data.captions) == list(expected)
    everything = dataset_train_data("wds/tiny", root=wds_root, pixels=square_pixels(64), seed=1)
    assert len(everything.images) == 24 and len(everything.test_images) == 8  # None: the whole split
    np.testing.assert_array_equal(everything.images[:20], data.images)


def test_labelled_dataset_path_trains_and_writes_a_checkpoint(wds_root, tmp_path, one_thread):
    out = tmp_path / "clip.pt"
    res = pretrain(dataset="wds/tiny", data_root=wds_root, n_train=20, n_test=6, out_path=out, steps=4,
                   batch_size=8, warmup=1, threads=1, eval_every=2, log_dir=str(tmp_path / "live"))
    assert set(res) == {"wds/tiny", "mean", "train_seconds"}
    assert 0.0 <= res["wds/tiny"] <= 1.0 and res["mean"] == res["wds/tiny"]
    model, _, _ = build_model("clipprune-tiny", pretrained=str(out))  # loads into the arch it names
    fresh = build_model("clipprune-tiny")[0].state_dict()
    trained = load_checkpoint(out, arch="clipprune-tiny")
    assert not torch.equal(trained["visual.conv1.weight"], fresh["visual.conv1.weight"])  # it trained


def test_pretrain_wants_exactly_one_source(tmp_path):
    with pytest.raises(ClipPruneError, match="either world_root"):
        pretrain(out_path=tmp_path / "x.pt", steps=1)
    with pytest.raises(ClipPruneError, match="either world_root"):
        pretrain(out_path=tmp_path / "x.pt", world_root=tmp_path, dataset="wds/tiny", steps=1)


def test_synth_path_feeds_what_it_always_fed(tmp_path, monkeypatch, one_thread):
    """The first batch (initial weights, images, tokens) equals a reimplementation of the code before the
    labelled-dataset path existed: same RNG use, same order, so the default pipeline's metrics do not move."""
    import clipprune.pretrain as P

    world = tmp_path / "world"
    synth.write_world(world, n_train=48, n_test=8, seed=5)
    seed, batch = 2, 16
    seen = {}
    real_build = P.build_model

    def spying_build(arch):
        model, preprocess, tokenizer = real_build(arch)
        forward = model.forward

        def spy(image, text):
            if not seen:
                seen.update(image=image.clone(), text=text.clone(),
                            state={k: v.clone() for k, v in model.state_dict().items()})
            return forward(image, text)
        model.forward = spy
        return model, preprocess, tokenizer

    monkeypatch.setattr(P, "build_model", spying_build)
    P.pretrain(world_root=world, out_path=tmp_path / "clip.pt", steps=1, batch_size=batch, warmup=1, seed=seed,
               threads=1, eval_every=0)

    # The old code: manual_seed, build, read the npz, tokenize every caption, a seeded randperm's first batch.
    torch.manual_seed(seed)
    model, _, tokenizer = real_build("clipprune-tiny")
    with np.load(world / "train.npz") as f:
        images, captions = f["images"], f["captions"]
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:batch]
    assert torch.equal(seen["image"], images_to_input(torch.from_numpy(images)[idx], model))
    assert torch.equal(seen["text"], tokenizer([str(c) for c in captions[idx.numpy()]]))
    state = model.state_dict()
    assert all(torch.equal(seen["state"][k], state[k]) for k in state)


@pytest.mark.slow  # about a minute: make test-all and CI run it
def test_cifar10_profile_runs_every_stage(wds_root, tmp_path):
    """profiles/cifar10.yaml validates and every stage runs on a tiny stand-in for CIFAR-10, with n_test below the
    test split's size (as the profile's 2,000 of 10,000): the rankings, predictor and evaluation see that prefix."""
    profile = ROOT / "profiles" / "cifar10.yaml"
    config.load(*config.SECTIONS, path=profile)
    params = yaml.safe_load(profile.read_text())
    assert params["data"]["datasets"] == ["wds/cifar10"] and params["model"]["arch"] == "clipprune-tiny"
    params["data"].update(source=str(wds_root), n_train=12, n_test=4)
    run_every_stage(params, tmp_path, n_ranked=6)
    assert (tmp_path / "data" / "cifar10" / "wds-cifar10" / "train" / "nshards.txt").is_file()
    report = yaml.safe_load((tmp_path / "reports" / "pretrain.json").read_text())
    assert set(report["zeroshot_top1"]) == {"wds/cifar10", "mean"}
    test_ranking = torch.load(tmp_path / "rankings" / "wds-cifar10-test.pt")
    assert len(test_ranking["labels"]) == 4 and test_ranking["labels"].tolist() == TEST_LABELS[:4]
    metrics = yaml.safe_load((tmp_path / "reports" / "metrics.json").read_text())
    assert set(metrics["datasets"]["wds/cifar10"]) == set(params["eval"]["methods"])
