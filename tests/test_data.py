import io
import os
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import ToTensor

from clipprune.data import (DEFAULT_TEMPLATES, DataError, dataset_labels, few_shot_indices, load_dataset,
                            materialise)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CIFAR_WDS = Path("/work/shared/data/wds_cifar10")


def _image_bytes(value: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 255 - value, 0)).save(buf, format=fmt)
    return buf.getvalue()


def make_wds(root: Path, *, labels: dict[str, list[int]], classnames=("cat", "dog", "fish")) -> Path:
    """clip_benchmark's layout: root/<split>/{0..N-1}.tar + nshards.txt, classnames + templates at the root.
    Two samples per shard, alternating png/jpg, so multi-shard reading is exercised."""
    for split, ys in labels.items():
        (root / split).mkdir(parents=True)
        shards = [ys[i:i + 2] for i in range(0, len(ys), 2)]
        for s, chunk in enumerate(shards):
            with wds.TarWriter(str(root / split / f"{s}.tar")) as w:
                for j, y in enumerate(chunk):
                    ext = "png" if j % 2 == 0 else "jpg"
                    w.write({"__key__": f"s{2 * s + j:07d}", ext: _image_bytes(40 * y, ext.replace("jpg", "jpeg")),
                             "cls": y})
        (root / split / "nshards.txt").write_text(str(len(shards)))
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    return root


def make_folder(root: Path, *, split: str = "test", classes=("big_cat", "dog"), per_class: int = 3) -> Path:
    for c, name in enumerate(classes):
        d = root / split / name
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (50 * c, 10 * i, 0)).save(d / f"{i}.png")
    return root


def test_wds_loads_through_clip_benchmark(tmp_path):
    root = make_wds(tmp_path / "tiny", labels={"test": [0, 1, 2, 0, 1], "train": [2, 2]})
    ld = load_dataset("wds/tiny", root=root, split="test", transform=ToTensor())
    assert ld.iterable
    assert ld.classnames == ["cat", "dog", "fish"]
    assert ld.templates == ["a photo of a {c}.", "a drawing of a {c}."]
    samples = list(ld.dataset)
    assert [y for _, y in samples] == [0, 1, 2, 0, 1]  # shard and file order kept: no shard shuffling
    assert samples[0][0].shape == (3, 8, 8)
    batches = list(ld.loader(batch_size=2))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 1, 2, 0, 1]
    assert dataset_labels(ld.dataset) == [0, 1, 2, 0, 1]
    assert [y for _, y in load_dataset("wds/tiny", root=root, split="train").dataset] == [2, 2]


@pytest.mark.parametrize("breakage, culprit", [
    (lambda r: (r / "test" / "nshards.txt").unlink(), "nshards.txt"),
    (lambda r: (r / "test" / "1.tar").unlink(), "test"),
    (lambda r: (r / "test" / "nshards.txt").write_text("many"), "nshards.txt"),
    (lambda r: (r / "classnames.txt").unlink(), "classnames.txt"),
    (lambda r: (r / "zeroshot_classification_templates.txt").unlink(), "zeroshot_classification_templates.txt"),
])
def test_wds_bad_layout_is_one_line_data_error(tmp_path, breakage, culprit):
    root = make_wds(tmp_path / "tiny", labels={"test": [0, 1, 2]})
    breakage(root)
    with pytest.raises(DataError) as e:
        load_dataset("wds/tiny", root=root, split="test")
    msg = str(e.value)
    assert culprit in msg and str(root) in msg and "\n" not in msg


def test_wds_empty_shard(tmp_path):
    root = make_wds(tmp_path / "tiny", labels={"test": [0]})
    with wds.TarWriter(str(root / "test" / "0.tar")):
        pass
    with pytest.raises(DataError, match="0.tar.*no samples"):
        load_dataset("wds/tiny", root=root, split="test")


def test_wds_corrupt_image_names_shard_and_key(tmp_path):
    root = make_wds(tmp_path / "tiny", labels={"test": [0, 1]})
    with wds.TarWriter(str(root / "test" / "0.tar")) as w:
        w.write({"__key__": "good", "png": _image_bytes(0, "png"), "cls": 0})
        w.write({"__key__": "bad", "jpg": b"not a jpeg", "cls": 1})
    it = iter(load_dataset("wds/tiny", root=root, split="test").dataset)
    assert next(it)[1] == 0  # the good sample before it still loads
    with pytest.raises(DataError) as e:
        next(it)
    assert "0.tar" in str(e.value) and "'bad'" in str(e.value) and "\n" not in str(e.value)


def test_folder_defaults_and_files(tmp_path):
    root = make_folder(tmp_path / "f")
    ld = load_dataset("folder", root=root, split="test", transform=ToTensor())
    assert ld.classnames == ["big cat", "dog"]
    assert ld.templates == DEFAULT_TEMPLATES
    assert len(ld.dataset) == 6 and not ld.iterable
    assert dataset_labels(ld.dataset) == [0, 0, 0, 1, 1, 1]
    images, labels = next(iter(ld.loader(batch_size=4)))
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 0, 0, 1]

    (root / "classnames.txt").write_text("large cat\nhound\n")
    (root / "templates.txt").write_text("a photo of a {c}.\n\na sketch of a {c}.\n")
    ld = load_dataset("folder", root=root, split="test")
    assert ld.classnames == ["large cat", "hound"]
    assert ld.templates == ["a photo of a {c}.", "a sketch of a {c}."]

    (root / "classnames.txt").write_text("only one\n")
    with pytest.raises(DataError, match="classnames.txt.*1 names for 2"):
        load_dataset("folder", root=root, split="test")


@pytest.mark.parametrize("payload", [b"not an image at all", "truncated"])
def test_folder_corrupt_image_fails_at_that_item(tmp_path, payload):
    root = make_folder(tmp_path / "f")
    bad = root / "test" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40] if payload == "truncated" else payload)
    ds = load_dataset("folder", root=root, split="test").dataset
    ds[0]  # other items are unaffected
    with pytest.raises(DataError) as e:
        ds[4]
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_missing_root_empty_and_unknown(tmp_path):
    for name in ("folder", "wds/x", "synth/size", "cifar10"):
        with pytest.raises(DataError, match=str(tmp_path / "nope")):
            load_dataset(name, root=tmp_path / "nope", split="test")
    with pytest.raises(DataError, match="no data root"):
        load_dataset("folder", root=None, split="test")

    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(DataError, match=str(tmp_path / "empty" / "test")):
        load_dataset("folder", root=tmp_path / "empty", split="test")
    (tmp_path / "empty" / "test" / "cls_a").mkdir()  # a class folder without images
    with pytest.raises(DataError, match="cls_a"):
        load_dataset("folder", root=tmp_path / "empty", split="test")
    with pytest.raises(DataError, match="split folder missing"):
        load_dataset("folder", root=tmp_path / "empty", split="train")

    with pytest.raises(DataError, match="unknown dataset name 'no_such_set'") as e:
        load_dataset("no_such_set", root=tmp_path, split="test")
    assert str(tmp_path) in str(e.value)


def test_few_shot_indices():
    labels = [0] * 10 + [1] * 3 + [2] * 7 + [5] * 1
    a = few_shot_indices(labels, shots=4, seed=0)
    assert a == few_shot_indices(labels, shots=4, seed=0) == sorted(a)
    per_class = {c: sum(labels[i] == c for i in a) for c in (0, 1, 2, 5)}
    assert per_class == {0: 4, 1: 3, 2: 4, 5: 1}  # short classes give all they have
    assert a != few_shot_indices(labels, shots=4, seed=1)
    assert set(few_shot_indices(labels, shots=2, seed=0)) <= set(a)  # nested in k
    # a class's pick depends only on its own examples: dropping class 2 leaves class 0's pick unchanged
    without_2 = [y if y != 2 else 9 for y in labels]
    assert [i for i in few_shot_indices(without_2, shots=4, seed=0) if labels[i] == 0] == \
        [i for i in a if labels[i] == 0]
    assert few_shot_indices(labels, shots=100, seed=3) == list(range(len(labels)))
    with pytest.raises(DataError):
        few_shot_indices(labels, shots=0, seed=0)


def test_dataset_labels_falls_back_to_iterating():
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(1), 2 - i

    assert dataset_labels(Plain()) == [2, 1, 0]


def test_materialise_copies_and_checks(tmp_path):
    src = make_wds(tmp_path / "src_wds", labels={"test": [0, 1, 2]})
    dest = materialise("wds/tiny", dest=tmp_path / "data" / "tiny", source=src)
    assert [y for _, y in load_dataset("wds/tiny", root=dest, split="test").dataset] == [0, 1, 2]
    assert not (tmp_path / "data" / "tiny.partial").exists()
    assert (src / "test" / "0.tar").stat().st_ino != (dest / "test" / "0.tar").stat().st_ino  # a copy

    fsrc = make_folder(tmp_path / "src_f", split="train")
    fdest = materialise("folder", dest=tmp_path / "data" / "f", source=fsrc)
    assert len(load_dataset("folder", root=fdest, split="train").dataset) == 6

    (src / "classnames.txt").unlink()
    with pytest.raises(DataError, match="classnames.txt"):
        materialise("wds/tiny", dest=tmp_path / "data" / "broken", source=src)
    assert not (tmp_path / "data" / "broken").exists() and not (tmp_path / "data" / "broken.partial").exists()
    with pytest.raises(DataError, match="source root"):
        materialise("wds/tiny", dest=tmp_path / "data" / "x", source=tmp_path / "missing")
    with pytest.raises(DataError, match="download"):
        materialise("cifar10", dest=tmp_path / "data" / "c")


def test_synth_through_load_dataset(tmp_path):
    from clipprune import synth  # the module under test: an import error must fail, never skip
    root = materialise("synth", dest=tmp_path / "synth", n_train=6, n_test=4, seed=0)
    ld = load_dataset("synth/size", root=root, split="test", transform=ToTensor())
    assert ld.classnames == synth.TASKS["size"]["classnames"] and ld.templates == synth.TASKS["size"]["templates"]
    assert len(ld.dataset) == 4 and ld.dataset[0][0].ndim == 3
    assert len(dataset_labels(ld.dataset)) == 4
    with pytest.raises(DataError, match="unknown synthetic task"):
        load_dataset("synth/nope", root=root, split="test")
    with pytest.raises(DataError, match="val.npz"):
        load_dataset("synth/size", root=root, split="val")


@pytest.mark.skipif(not CIFAR_WDS.is_dir(), reason="shared CIFAR-10 webdataset not present")
def test_real_cifar10_wds_first_samples():
    ld = load_dataset("wds/cifar10", root=CIFAR_WDS, split="test", transform=ToTensor())
    assert ld.classnames[:3] == ["airplane", "automobile", "bird"] and len(ld.classnames) == 10
    assert len(ld.templates) == 18 and all("{c}" in t for t in ld.templates)
    images, labels = next(iter(ld.loader(batch_size=5)))
    assert images.shape == (5, 3, 32, 32) and all(0 <= y < 10 for y in labels.tolist())


def test_wds_indexable_matches_the_stream_in_order(tmp_path):
    """Golden search indexes images by position; evaluation streams them: both must see the same order."""
    from torchvision.transforms import ToTensor

    root = make_wds(tmp_path / "wds", labels={"test": [2, 0, 1, 1, 0]})
    ds = load_dataset("wds/toy", root=root, split="test", transform=ToTensor())
    streamed = list(ds.dataset)
    indexed = ds.indexable()
    assert len(indexed) == 5 and indexed.targets == [2, 0, 1, 1, 0] and indexed.classes == ["cat", "dog", "fish"]
    for i, (x, y) in enumerate(streamed):
        assert torch.equal(indexed[i][0], x) and indexed[i][1] == y
    folder = load_dataset("folder", root=make_folder(tmp_path / "f"), split="test")
    assert folder.indexable() is folder.dataset  # map-style datasets are already indexable


# ----------------------------------------------------------------------------------------------------------
# the data stage verifies what it stages: every image decoded, every shard read to its end

def _noise_image(path: Path, fmt: str) -> None:
    """A 48x48 noise image: its compressed data is most of the file, so a cut lands in the pixels."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def _truncate(path: Path, fmt: str) -> Path:
    _noise_image(path, fmt)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 6 // 10])
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x00\x01 not an image " * 20)
    return path


def _cut_shard(shard: Path, where: str) -> Path:
    import tarfile

    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    at = members[0].offset_data + members[0].size // 2 if where == "mid-member" else members[2].offset
    shard.write_bytes(shard.read_bytes()[:at])
    return shard


def _bad_member(root: Path) -> Path:
    with wds.TarWriter(str(root / "test" / "0.tar")) as w:
        w.write({"__key__": "good", "png": _image_bytes(0, "png"), "cls": 0})
        w.write({"__key__": "bad", "jpg": _image_bytes(9, "jpeg")[:200], "cls": 1})
    return root / "test" / "0.tar"


def _coop_image(src: Path) -> Path:
    from test_coop import make_coop

    return make_coop(src, "OxfordPets")["train"][4][0]


# case: (dataset name, build the source, break it -> the file the error must name)
BROKEN = {
    "coop truncated jpeg": ("coop/OxfordPets", None, lambda src: _truncate(_coop_image(src), "JPEG")),
    "coop garbage file": ("coop/OxfordPets", None, lambda src: _garbage(_coop_image(src))),
    "folder truncated png": ("folder", make_folder, lambda src: _truncate(src / "test" / "dog" / "1.png", "PNG")),
    "folder truncated jpeg": ("folder", make_folder,
                              lambda src: _truncate(src / "test" / "dog" / "1.png", "JPEG")),  # a .png holding a jpeg
    "folder garbage file": ("folder", make_folder, lambda src: _garbage(src / "test" / "big_cat" / "2.png")),
    "wds shard cut mid-member": ("wds/tiny", lambda r: make_wds(r, labels={"test": [0, 1, 2]}),
                                 lambda src: _cut_shard(src / "test" / "0.tar", "mid-member")),
    "wds shard cut between samples": ("wds/tiny", lambda r: make_wds(r, labels={"test": [0, 1, 2]}),
                                      lambda src: _cut_shard(src / "test" / "0.tar", "between")),
    "wds truncated image in a shard": ("wds/tiny", lambda r: make_wds(r, labels={"test": [0, 1, 2]}), _bad_member),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_staging_names_the_first_bad_file(tmp_path, case):
    name, build, breakage = BROKEN[case]
    src = tmp_path / "src"
    if build:
        build(src)
    culprit = breakage(src)
    dest = tmp_path / "data" / "x"
    with pytest.raises(DataError) as e:
        materialise(name, dest=dest, source=src, cache=tmp_path / "cache", splits=("train", "test"))
    msg = str(e.value)
    assert msg.startswith(str(culprit)) and "\n" not in msg and "Traceback" not in msg
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())  # nothing staged


def test_good_sources_stage_after_full_verification(tmp_path):
    from clipprune.data import verify_images, verify_wds

    src = make_wds(tmp_path / "w", labels={"test": [0, 1, 2, 0, 1]})
    assert verify_wds(src, split="test") == 5  # every image of every shard decoded
    folder = make_folder(tmp_path / "f")
    _noise_image(folder / "test" / "dog" / "3.png", "JPEG")  # a whole noise JPEG decodes
    assert verify_images(sorted((folder / "test").rglob("*.png")), fix="-") == 7


def test_data_stage_bad_image_through_the_shell(tmp_path):
    """`python -m stages.data` on a source whose second dataset holds a truncated JPEG: exit 2, one stderr line
    naming the file, and no output folder at all (the first dataset, already staged, is not left behind)."""
    import subprocess
    import sys

    import yaml

    from test_coop import make_coop

    make_coop(tmp_path / "DATA", "DTD")
    bad = _truncate(make_coop(tmp_path / "DATA", "OxfordPets")["test"][1][0], "JPEG")
    root = Path(__file__).resolve().parent.parent
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(datasets=["coop/DTD", "coop/OxfordPets"], root="data/coop", source=str(tmp_path / "DATA"),
                          download=False, cache=str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run(["bash", "-c", f"{sys.executable} -m stages.data"], cwd=work, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: cannot decode image"), out.stderr
    assert sorted(os.listdir(work)) == ["params.yaml"]  # no data/coop, no data/coop.partial
