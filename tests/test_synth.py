import json
import re

import numpy as np
import pytest

from clipprune import synth


@pytest.fixture(scope="module")
def train():
    return synth.generate(400, seed=0, split="train")


@pytest.fixture(scope="module")
def test():
    return synth.generate(400, seed=0, split="test")


def test_deterministic_by_seed(train):
    again = synth.generate(400, seed=0, split="train")
    for k, v in train.items():
        assert np.array_equal(np.asarray(v), np.asarray(again[k])), k
    other = synth.generate(400, seed=1, split="train")
    assert not np.array_equal(train["images"], other["images"])


def test_shapes_and_dtypes(train):
    assert train["images"].shape == (400, 64, 64, 3) and train["images"].dtype == np.uint8
    assert train["fg_mask"].shape == (400, 64, 64) and train["fg_mask"].dtype == bool
    for task, spec in synth.TASKS.items():
        assert train[task].dtype == np.int64
        assert set(np.unique(train[task])) == set(range(len(spec["classnames"]))), task
        assert all("{c}" in t for t in spec["templates"])


@pytest.mark.parametrize("split", ["train", "test"])
def test_captions_agree_with_labels(split, train, test):
    data = {"train": train, "test": test}[split]
    dropped = 0
    for i, cap in enumerate(data["captions"]):
        for task, names in synth.ATTRIBUTES.items():
            present = [n for n in names if re.search(rf"\b{n}\b", cap)]
            assert len(present) <= 1, (cap, task)
            if present:
                assert present[0] == names[data[task][i]], (cap, task)
            else:
                dropped += 1
                assert split == "train", f"test captions name every attribute: {cap}"
    if split == "train":  # about 30% of the attribute words are dropped
        assert 0.2 < dropped / (len(data["captions"]) * len(synth.ATTRIBUTES)) < 0.4


def test_foreground_is_a_minority_of_patches(train):
    assert train["fg_mask"].any(axis=(1, 2)).all()
    cov = synth.patch_coverage(train["fg_mask"])
    assert cov.mean() < 0.35
    # bigger size class, more patches
    means = [cov[train["size"] == k].mean() for k in range(3)]
    assert means[0] < means[1] < means[2]


def test_object_is_saturated_and_background_is_not(train):
    img = train["images"].astype(np.int16)
    sat = img.max(axis=-1) - img.min(axis=-1)
    fg = train["fg_mask"]
    solid = fg & (train["pattern"] == 0)[:, None, None]
    assert np.median(sat[solid]) > 120
    assert np.median(sat[~fg]) < 40


def test_held_out_pairs(train, test):
    def pairs(d):
        return {(synth.ATTRIBUTES["shape"][s], synth.ATTRIBUTES["colour"][c]) for s, c in zip(d["shape"], d["colour"])}
    assert not pairs(train) & set(synth.HELD_OUT_PAIRS)
    assert set(synth.HELD_OUT_PAIRS) <= pairs(test)


def test_write_world_and_dataset_round_trip(tmp_path):
    synth.write_world(tmp_path, n_train=64, n_test=32, seed=3)
    meta = json.loads((tmp_path / "world.json").read_text())
    assert meta["n_train"] == 64 and meta["seed"] == 3 and set(meta["tasks"]) == set(synth.TASKS)
    assert not list(tmp_path.glob("*.tmp"))
    ref = synth.generate(32, seed=3, split="test")
    ds = synth.SynthTaskDataset(tmp_path, split="test", task="position")
    assert len(ds) == 32 and ds.classes == synth.TASKS["position"]["classnames"]
    assert ds.templates == synth.TASKS["position"]["templates"]
    img, label = ds[5]
    assert img.size == (64, 64) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), ref["images"][5]) and label == ref["position"][5]
    ds = synth.SynthTaskDataset(tmp_path, split="train", task="shape", transform=lambda im: np.asarray(im).sum())
    x, label = ds[0]
    assert isinstance(label, int) and x > 0
    with np.load(tmp_path / "train.npz") as f:
        assert f["captions"].dtype.kind == "U" and len(f["captions"]) == 64


def test_missing_or_corrupt_world_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        synth.SynthTaskDataset(tmp_path / "nope", split="test", task="shape")
    (tmp_path / "test.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="test.npz"):
        synth.SynthTaskDataset(tmp_path, split="test", task="shape")
    with pytest.raises(ValueError, match="unknown synthetic task"):
        synth.SynthTaskDataset(tmp_path, split="test", task="texture")


def test_written_world_files_are_byte_identical(tmp_path):
    """The files, not only the arrays: DVC hashes them, and a timestamp in the zip would rerun the pipeline."""
    synth.write_world(tmp_path / "a", n_train=40, n_test=20, seed=5)
    synth.write_world(tmp_path / "b", n_train=40, n_test=20, seed=5)
    for name in ("train.npz", "test.npz", "world.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    loaded = np.load(tmp_path / "a" / "test.npz")
    assert np.array_equal(loaded["images"], synth.generate(20, seed=5, split="test")["images"])
