import json
import os
import shutil
import urllib.error
from pathlib import Path

import pytest
from PIL import Image
from torchvision.transforms import ToTensor

from clipprune.coop import COOP_DATASETS, SOURCES, load_coop, resolve
from clipprune.data import DataError, dataset_labels, load_dataset, materialise

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PER_SPLIT = {"train": 2, "val": 1, "test": 2}  # images per class, so each split has its own size

# Per split-json dataset: the class names as CoOp's split file stores them, what prompts get, and the
# relpath (under the image dir) of image i of class c, shaped like the real dataset's files.
SPLIT_JSON = {
    "Caltech101": (["airplane", "face", "yin_yang"], ["airplane", "face", "yin yang"],
                   lambda c, i: f"{['airplanes', 'Faces', 'yin_yang'][c]}/image_{i:04d}.jpg"),
    "OxfordPets": (["abyssinian", "american_bulldog", "yorkshire_terrier"],
                   ["abyssinian", "american bulldog", "yorkshire terrier"], lambda c, i: f"Breed{c}_{i}.jpg"),
    "Flowers102": (["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
                   ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"],
                   lambda c, i: f"image_{100 * c + i:05d}.jpg"),
    "Food101": (["apple_pie", "baby_back_ribs", "waffles"], ["apple pie", "baby back ribs", "waffles"],
                lambda c, i: f"{['apple_pie', 'baby_back_ribs', 'waffles'][c]}/{1000 + i}.jpg"),
    "DTD": (["banded", "blotchy", "zigzagged"], ["banded", "blotchy", "zigzagged"],
            lambda c, i: f"{['banded', 'blotchy', 'zigzagged'][c]}/x_{i:04d}.jpg"),
    # CoOp's ucf101.py renames CamelCase actions with '_' (ApplyEyeMakeup -> Apply_Eye_Makeup) when it
    # writes the split; prompts then get '_' -> ' '.
    "UCF101": (["Apply_Eye_Makeup", "Yo_Yo", "Playing_Daf"], ["Apply Eye Makeup", "Yo Yo", "Playing Daf"],
               lambda c, i: f"{['Apply_Eye_Makeup', 'Yo_Yo', 'Playing_Daf'][c]}/v_{c}_g{i:02d}_c01.jpg"),
    # CoOp's eurosat.py wrote its split with NEW_CNAMES applied, so the file already says "Annual Crop Land".
    "EuroSAT": (["Annual Crop Land", "Herbaceous Vegetation Land", "Sea or Lake"],
                ["Annual Crop Land", "Herbaceous Vegetation Land", "Sea or Lake"],
                lambda c, i: f"{['AnnualCrop', 'HerbaceousVegetation', 'SeaLake'][c]}/"
                             f"{['AnnualCrop', 'HerbaceousVegetation', 'SeaLake'][c]}_{i + 1}.jpg"),
    # stanford_cars.py puts the year first; relpaths start at stanford_cars/ itself (image_dir "").
    "StanfordCars": (["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 smart fortwo Convertible"],
                     ["2000 AM General Hummer SUV", "2012 Acura RL Sedan", "2012 smart fortwo Convertible"],
                     lambda c, i: f"{'cars_train' if i < 3 else 'cars_test'}/{100 * c + i + 1:05d}.jpg"),
    # sun397.py: the folder path after the letter, reversed ("a/apartment_building/outdoor" -> "outdoor ...").
    "SUN397": (["abbey", "outdoor apartment_building", "zen_garden"],
               ["abbey", "outdoor apartment building", "zen garden"],
               lambda c, i: f"{['a/abbey', 'a/apartment_building/outdoor', 'z/zen_garden'][c]}/sun_{c}{i:04d}.jpg"),
}
AIRCRAFT = ["707-320", "F/A-18", "Cessna 172"]  # '/' and spaces stay; labels follow variants.txt order
IMAGENET = {"n02085620": "Chihuahua", "n01440764": "tench", "n01443537": "goldfish"}  # file order != wnid order
TEMPLATES = {"Caltech101": "a photo of a {c}.", "OxfordPets": "a photo of a {c}, a type of pet.",
             "Flowers102": "a photo of a {c}, a type of flower.", "Food101": "a photo of {c}, a type of food.",
             "FGVCAircraft": "a photo of a {c}, a type of aircraft.", "DTD": "{c} texture.",
             "UCF101": "a photo of a person doing {c}.", "ImageNet": "a photo of a {c}.",
             "EuroSAT": "a centered satellite photo of {c}.", "StanfordCars": "a photo of a {c}.",
             "SUN397": "a photo of a {c}."}


def _jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value % 256, 0, 0)).save(path, format="JPEG")


def make_coop(data: Path, name: str) -> dict:
    """A tiny CoOp layout of `name` under the DATA root `data`; returns {split: [(image path, label)]}, classes."""
    spec = COOP_DATASETS[name]
    ddir, image_dir = data / spec.folder, data / spec.folder / spec.image_dir
    expected = {}
    if name in SPLIT_JSON:
        raw, _, relpath = SPLIT_JSON[name]
        table, n = {}, 0
        for split, k in PER_SPLIT.items():
            # class order 2, 0, 1 so a reader that relabels by listing order would be caught
            rows = [(relpath(c, n + i), c, raw[c]) for i in range(k) for c in (2, 0, 1)]
            n += k
            table[split] = rows
            expected[split] = [(image_dir / p, c) for p, c, _ in rows]
            for p, c, _ in rows:
                _jpeg(image_dir / p, 40 * c)
        (ddir / spec.split_file).write_text(json.dumps(table))
    elif name == "FGVCAircraft":
        ddir.mkdir(parents=True)
        (ddir / "variants.txt").write_text("\n".join(AIRCRAFT) + "\n")
        n = 0
        for split, k in PER_SPLIT.items():
            rows = [(f"{1000000 + n + 10 * c + i:07d}", c) for i in range(k) for c in (1, 2, 0)]
            n += 100
            (ddir / f"images_variant_{split}.txt").write_text("".join(f"{i} {AIRCRAFT[c]}\n" for i, c in rows))
            expected[split] = [(image_dir / f"{i}.jpg", c) for i, c in rows]
            for i, c in rows:
                _jpeg(image_dir / f"{i}.jpg", 40 * c)
    elif name == "ImageNet":
        ddir.mkdir(parents=True)
        (ddir / "classnames.txt").write_text("".join(f"{w} {c}\n" for w, c in IMAGENET.items()))
        for split, folder in (("train", "train"), ("test", "val")):
            expected[split] = []
            for y, wnid in enumerate(sorted(IMAGENET)):
                for i in range(PER_SPLIT[split]):
                    p = image_dir / folder / wnid / f"{wnid}_{i}.JPEG"
                    _jpeg(p, 40 * y)
                    expected[split].append((p, y))
        expected["val"] = expected["test"]  # CoOp: the 50k val set is both val and test
    return expected


def expected_classes(name: str) -> list[str]:
    if name in SPLIT_JSON:
        return SPLIT_JSON[name][1]
    return AIRCRAFT if name == "FGVCAircraft" else [IMAGENET[w] for w in sorted(IMAGENET)]


@pytest.mark.parametrize("name", list(COOP_DATASETS))
def test_each_dataset_through_load_dataset(tmp_path, name):
    expected = make_coop(tmp_path / "DATA", name)
    for split in ("train", "val", "test"):
        ld = load_dataset(f"coop/{name}", root=tmp_path / "DATA", split=split)
        assert ld.classnames == expected_classes(name) == ld.dataset.classes
        assert ld.templates == [TEMPLATES[name]] == ld.dataset.templates
        assert len(ld.dataset) == len(expected[split])
        assert [(Path(p), y) for p, y in ld.dataset.samples] == expected[split]
        assert dataset_labels(ld.dataset) == [y for _, y in expected[split]]  # read from .targets
    image, label = ld.dataset[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == expected["test"][0][1]
    image, _ = load_dataset(f"coop/{name}", root=tmp_path / "DATA", split="test", transform=ToTensor()).dataset[0]
    assert image.shape == (3, 4, 4)
    # root may also be the dataset's own folder
    own = load_coop(name, root=tmp_path / "DATA" / COOP_DATASETS[name].folder, split="train")
    assert own.dataset.targets == [y for _, y in expected["train"]]


def test_split_sizes_and_aliases(tmp_path):
    make_coop(tmp_path, "DTD")
    sizes = {s: len(load_coop("DescribableTextures", root=tmp_path, split=s).dataset) for s in ("train", "val", "test")}
    assert sizes == {"train": 6, "val": 3, "test": 6}
    assert [p.format(c="banded") for p in load_coop("DTD", root=tmp_path, split="val").templates] == ["banded texture."]


def test_missing_root_folder_split_file(tmp_path):
    with pytest.raises(DataError, match="no data root"):
        load_dataset("coop/DTD", root=None, split="test")
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_dataset("coop/DTD", root=tmp_path / "nope", split="test")
    (tmp_path / "DATA").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("coop/DTD", root=tmp_path / "DATA", split="test")
    msg = str(e.value)  # says which archive and which split file go where
    assert str(tmp_path / "DATA" / "dtd") in msg and "dtd-r1.0.1.tar.gz" in msg
    assert "split_zhou_DescribableTextures.json" in msg and "\n" not in msg

    make_coop(tmp_path / "DATA", "OxfordPets")
    split_file = tmp_path / "DATA" / "oxford_pets" / "split_zhou_OxfordPets.json"
    split_file.write_text("{not json")
    with pytest.raises(DataError, match="not a CoOp split file"):
        load_coop("OxfordPets", root=tmp_path / "DATA", split="test")
    split_file.unlink()
    with pytest.raises(DataError) as e:
        load_coop("OxfordPets", root=tmp_path / "DATA", split="test")
    assert str(split_file) in str(e.value) and SOURCES["OxfordPets"].split_url in str(e.value)

    make_coop(tmp_path / "DATA", "Food101")
    shutil.rmtree(tmp_path / "DATA" / "food-101" / "images")
    with pytest.raises(DataError, match=str(tmp_path / "DATA" / "food-101" / "images")):
        load_coop("Food101", root=tmp_path / "DATA", split="test")


def test_missing_and_corrupt_image(tmp_path):
    expected = make_coop(tmp_path, "UCF101")
    gone = expected["test"][3][0]
    gone.unlink()
    with pytest.raises(DataError) as e:
        load_coop("UCF101", root=tmp_path, split="test")
    assert str(gone) in str(e.value) and "1 of 6" in str(e.value) and "UCF-101-midframes.zip" in str(e.value)
    load_coop("UCF101", root=tmp_path, split="train")  # other splits are unaffected

    bad = expected["train"][1][0]
    bad.write_bytes(b"not a jpeg")
    ds = load_coop("UCF101", root=tmp_path, split="train").dataset
    with pytest.raises(DataError, match=str(bad)):
        ds[1]


def test_aircraft_and_imagenet_errors(tmp_path):
    make_coop(tmp_path, "FGVCAircraft")
    with open(tmp_path / "fgvc_aircraft" / "images_variant_val.txt", "a") as f:
        f.write("1234567 Boeing 999\n")
    with pytest.raises(DataError, match="line 4 has variant 'Boeing 999'"):
        load_coop("FGVCAircraft", root=tmp_path, split="val")
    (tmp_path / "fgvc_aircraft" / "variants.txt").unlink()
    with pytest.raises(DataError, match=str(tmp_path / "fgvc_aircraft" / "variants.txt")):
        load_coop("FGVCAircraft", root=tmp_path, split="train")

    make_coop(tmp_path, "ImageNet")
    shutil.rmtree(tmp_path / "imagenet" / "images" / "val" / "n01443537")  # would shift every later label
    with pytest.raises(DataError, match="no folder: \\['n01443537'\\]"):
        load_coop("ImageNet", root=tmp_path, split="test")
    (tmp_path / "imagenet" / "classnames.txt").unlink()
    with pytest.raises(DataError, match=str(tmp_path / "imagenet" / "classnames.txt")):
        load_coop("ImageNet", root=tmp_path, split="train")


def test_unknown_name_and_split(tmp_path):
    make_coop(tmp_path, "DTD")
    with pytest.raises(DataError, match="unknown split 'validation'"):
        load_coop("DTD", root=tmp_path, split="validation")
    with pytest.raises(DataError, match="unknown CoOp dataset"):
        load_dataset("coop/SUN398", root=tmp_path, split="test")


def test_resolve_both_protocols():
    assert [resolve(n) for n in COOP_DATASETS] == [f"coop/{n}" for n in COOP_DATASETS]
    assert resolve("OxfordFlowers", "coop") == "coop/Flowers102"
    assert {n: resolve(n, "clip_benchmark") for n in COOP_DATASETS if n != "UCF101"} == {
        "Caltech101": "vtab/caltech101", "OxfordPets": "pets", "Flowers102": "flowers", "Food101": "food101",
        "FGVCAircraft": "fgvc_aircraft", "DTD": "dtd", "ImageNet": "imagenet1k", "EuroSAT": "eurosat",
        "StanfordCars": "cars", "SUN397": "sun397"}
    with pytest.raises(DataError, match="clip_benchmark has no UCF101"):
        resolve("UCF101", "clip_benchmark")
    with pytest.raises(DataError, match="unknown protocol"):
        resolve("DTD", "dassl")


def test_materialise_copies_and_checks(tmp_path):
    make_coop(tmp_path / "src", "Caltech101")
    dest = materialise("coop/Caltech101", dest=tmp_path / "data" / "caltech", source=tmp_path / "src")
    assert len(load_dataset("coop/Caltech101", root=dest, split="test").dataset) == 6
    assert not (tmp_path / "data" / "caltech.partial").exists()

    (tmp_path / "src" / "caltech-101" / "split_zhou_Caltech101.json").unlink()
    with pytest.raises(DataError, match="split_zhou_Caltech101.json"):
        materialise("coop/Caltech101", dest=tmp_path / "data" / "broken", source=tmp_path / "src")
    assert not (tmp_path / "data" / "broken").exists() and not (tmp_path / "data" / "broken.partial").exists()

    with pytest.raises(DataError) as e:  # neither source nor download: say what to place where
        materialise("coop/Flowers102", dest=tmp_path / "data" / "flowers")
    msg = str(e.value)
    assert str(tmp_path / "data" / "flowers") in msg and "102flowers.tgz" in msg
    assert "split_zhou_OxfordFlowers.json" in msg and SOURCES["Flowers102"].split_url in msg


class FakeNet:
    """The network, and only the network, replaced (there is none here): torchvision's download_url and
    download_file_from_google_drive copy files out of a local folder and log each call to `log`. The archives
    are real .tar.gz files and torchvision's own extract_archive unpacks them."""

    def __init__(self, files: dict[str, Path], log: Path):
        self.files, self.log = files, log

    @property
    def calls(self) -> list[str]:
        return self.log.read_text().split() if self.log.is_file() else []

    def _fetch(self, key: str, root, filename) -> None:
        with open(self.log, "a") as f:
            f.write(key + "\n")
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copy(self.files[key], Path(root) / filename)

    def download_url(self, url, root, filename=None, md5=None, max_redirect_hops=3):
        self._fetch(url, root, filename or os.path.basename(url))

    def download_file_from_google_drive(self, file_id, root, filename=None, md5=None):
        self._fetch(file_id, root, filename or file_id)

    def install(self, monkeypatch) -> None:
        import torchvision.datasets.utils as tvu

        monkeypatch.setattr(tvu, "download_url", self.download_url)
        monkeypatch.setattr(tvu, "download_file_from_google_drive", self.download_file_from_google_drive)


def serve(stage: Path, net: Path) -> dict[str, Path]:
    """What the internet holds for DTD and FGVCAircraft, built from their make_coop layouts under `stage`:
    DTD's archive (dtd/images/...) and split file; FGVC's archive, whose data/ sits beside a README and an
    evaluation script as in the real fgvc-aircraft-2013b.tar.gz. Returns {url or Drive id: local file}."""
    import tarfile

    net.mkdir(parents=True)
    (net / "README.md").write_text("FGVC-Aircraft 2013b\n")
    (net / "evaluation.m").write_text("% scoring script\n")
    with tarfile.open(net / "dtd-r1.0.1.tar.gz", "w:gz") as tar:
        tar.add(stage / "dtd" / "images", arcname="dtd/images")
    with tarfile.open(net / "fgvc-aircraft-2013b.tar.gz", "w:gz") as tar:
        tar.add(stage / "fgvc_aircraft", arcname="fgvc-aircraft-2013b/data")
        for extra in ("README.md", "evaluation.m"):
            tar.add(net / extra, arcname=f"fgvc-aircraft-2013b/{extra}")
    split = net / "split_zhou_DescribableTextures.json"
    shutil.copy(stage / "dtd" / "split_zhou_DescribableTextures.json", split)
    dtd_gdrive = SOURCES["DTD"].steps[1][1]
    return {SOURCES["DTD"].archives[0]: net / "dtd-r1.0.1.tar.gz", dtd_gdrive: split,
            SOURCES["FGVCAircraft"].archives[0]: net / "fgvc-aircraft-2013b.tar.gz"}


def test_download_runs_documented_steps_into_the_cache(tmp_path, monkeypatch):
    make_coop(tmp_path / "stage", "DTD")
    make_coop(tmp_path / "stage", "FGVCAircraft")
    net = FakeNet(serve(tmp_path / "stage", tmp_path / "net"), tmp_path / "calls.log")
    net.install(monkeypatch)
    cache, dest = tmp_path / "cache", tmp_path / "data" / "coop"
    dtd_url = SOURCES["DTD"].archives[0]

    assert materialise("coop/DTD", dest=dest, cache=cache, download=True) == dest
    assert net.calls == [dtd_url, "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"]
    assert load_dataset("coop/DTD", root=dest, split="val").classnames == ["banded", "blotchy", "zigzagged"]
    assert sorted(os.listdir(cache)) == ["dtd"]  # the archive was removed once extracted
    # DVC deletes data.root before it reruns the data stage: the cache outlives it, nothing is fetched again
    shutil.rmtree(dest)
    materialise("coop/DTD", dest=dest, cache=cache, download=True)
    assert len(net.calls) == 2 and len(load_coop("DTD", root=dest, split="test").dataset) == 6

    materialise("coop/FGVCAircraft", dest=dest, cache=cache, download=True)
    assert (cache / "fgvc_aircraft" / "variants.txt").is_file()  # the archive's data/ moved into place
    assert sorted(os.listdir(cache)) == ["dtd", "fgvc_aircraft"]  # no stray fgvc-aircraft-2013b/ left
    assert sorted(os.listdir(dest)) == ["dtd", "fgvc_aircraft"]  # staging FGVC left DTD in place
    assert len(load_coop("FGVCAircraft", root=dest, split="test").dataset) == 6

    with pytest.raises(DataError, match="cannot be downloaded automatically.*image-net.org"):
        materialise("coop/ImageNet", dest=tmp_path / "data" / "in", cache=cache, download=True)
    with pytest.raises(DataError, match="needs its files.*data.cache|needs its files"):
        materialise("coop/Food101", dest=tmp_path / "data" / "food", cache=cache, download=False)

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    import torchvision.datasets.utils as tvu

    monkeypatch.setattr(tvu, "download_url", offline)
    with pytest.raises(DataError) as e:
        materialise("coop/Food101", dest=tmp_path / "data" / "food", cache=cache, download=True)
    assert "could not download Food101" in str(e.value) and "food-101.tar.gz" in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "data" / "food").exists()


def test_registries_are_complete():
    assert set(SOURCES) == set(COOP_DATASETS) == set(TEMPLATES)
    assert {n: s.template for n, s in COOP_DATASETS.items()} == TEMPLATES
    for name, spec in COOP_DATASETS.items():
        assert spec.split_file is None or SOURCES[name].split_url.startswith("https://drive.google.com/")


# ----------------------------------------------------------------------------------------------------------
# CoOp's real split files (../shared/data/coop_splits beside the clone), tiny stand-in images at their paths

# CLIPPRUNE_COOP_SPLITS: another folder of CoOp's split_zhou_*.json (a copy carried to a machine without ../shared).
REAL_SPLITS = Path(os.environ.get("CLIPPRUNE_COOP_SPLITS")
                   or Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "coop_splits")
# name: (classes, train/val/test sizes, first and last class name as prompts get them), from CoOp's published splits
REAL = {"Caltech101": (100, (4128, 1649, 2465), "face", "yin yang"),
        "OxfordPets": (37, (2944, 736, 3669), "abyssinian", "yorkshire terrier"),
        "DTD": (47, (2820, 1128, 1692), "banded", "zigzagged")}


def make_coop_from_split(data: Path, name: str, split_file: Path) -> int:
    """Dataset `name` under the DATA root `data` from a real split file: the file where CoOp reads it, one small
    stand-in JPEG at every path it lists (the same bytes each time: the layout is under test, not the pixels)."""
    import io

    spec = COOP_DATASETS[name]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 60, 30)).save(buf, format="JPEG")
    blob = buf.getvalue()
    ddir = data / spec.folder
    ddir.mkdir(parents=True)
    shutil.copy(split_file, ddir / spec.split_file)
    paths = {ddir / spec.image_dir / rel for rows in json.loads(split_file.read_text()).values() for rel, _, _ in rows}
    for d in {p.parent for p in paths}:
        d.mkdir(parents=True, exist_ok=True)
    for p in paths:
        p.write_bytes(blob)
    return len(paths)


@pytest.mark.slow  # ~21k stand-in images copied and decoded by the data stage
@pytest.mark.skipif(not REAL_SPLITS.is_dir(), reason=f"{REAL_SPLITS} (CoOp's real split files) is absent")
def test_real_split_files_staged_together_from_one_root(tmp_path):
    """Three datasets from one CoOp DATA root, staged together by the real data stage: each is there afterwards
    and loads with CoOp's class counts, split sizes, class names and template."""
    import subprocess
    import sys

    import yaml

    for name in REAL:
        make_coop_from_split(tmp_path / "DATA", name, REAL_SPLITS / COOP_DATASETS[name].split_file)
    root = Path(__file__).resolve().parent.parent
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(datasets=[f"coop/{n}" for n in REAL], root="data/coop", source=str(tmp_path / "DATA"),
                          download=False, cache=str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "stages.data"], cwd=work, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    data = work / "data" / "coop"
    assert sorted(os.listdir(data)) == sorted(COOP_DATASETS[n].folder for n in REAL)  # none wiped another
    for name, (n_classes, sizes, first, last) in REAL.items():
        for split, size in zip(("train", "val", "test"), sizes):
            ld = load_dataset(f"coop/{name}", root=data, split=split)
            assert len(ld.dataset) == size and len(ld.classnames) == n_classes
            assert (ld.classnames[0], ld.classnames[-1]) == (first, last)
            assert ld.templates == [TEMPLATES[name]]
            assert sorted(set(ld.dataset.targets)) == list(range(n_classes))
            assert all(Path(p).is_relative_to(data / COOP_DATASETS[name].folder) for p, _ in ld.dataset.samples)


SITECUSTOMIZE = '''
import json, os
from pathlib import Path
import test_coop
import torchvision.datasets.utils as tvu
net = test_coop.FakeNet({k: Path(v) for k, v in json.loads(os.environ["FAKE_NET"]).items()},
                        Path(os.environ["FAKE_NET_LOG"]))
tvu.download_url, tvu.download_file_from_google_drive = net.download_url, net.download_file_from_google_drive
'''


@pytest.mark.slow  # two dvc repro runs
def test_dvc_rerun_with_another_n_test_downloads_nothing(tmp_path):
    """The real data stage under real `dvc repro` (which deletes data.root before it reruns the stage), with only
    the network faked: the first run downloads DTD and FGVC into data.cache; after `n_test` changes, the rerun
    stages both again from the cache and fetches nothing."""
    import subprocess
    import sys

    import yaml

    make_coop(tmp_path / "stage", "DTD")
    make_coop(tmp_path / "stage", "FGVCAircraft")
    files = serve(tmp_path / "stage", tmp_path / "net")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import os\nif 'FAKE_NET' in os.environ:\n"
                                           + "".join(f"    {line}\n" for line in SITECUSTOMIZE.strip().splitlines()))
    (hook / "gdown").mkdir()  # the Drive client exists (the prerequisite check looks for it); the fake replaces it
    (hook / "gdown" / "__init__.py").write_text("")
    root = Path(__file__).resolve().parent.parent
    project = tmp_path / "project"
    project.mkdir()
    stage = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["data"]
    stage["deps"] = []  # the stage's code lives in the clone, reached through PYTHONPATH
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"data": stage}}))
    params = yaml.safe_load((root / "profiles" / "paper.yaml").read_text())
    params["data"].update(datasets=["coop/DTD", "coop/FGVCAircraft"], cache=str(tmp_path / "cache"), download=True)
    env = {**os.environ, "PYTHONPATH": f"{hook}:{root}:{root / 'tests'}", "OMP_NUM_THREADS": "1",
           "DVC_NO_ANALYTICS": "1", "FAKE_NET": json.dumps({k: str(v) for k, v in files.items()}),
           "FAKE_NET_LOG": str(tmp_path / "calls.log"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # `python` in dvc.yaml: this one
    dvc = [str(Path(sys.executable).parent / "dvc")]
    subprocess.run(dvc + ["init", "--no-scm", "-q"], cwd=project, env=env, check=True, capture_output=True)
    log = FakeNet({}, tmp_path / "calls.log")
    for n_test in (1000, 7):
        params["data"]["n_test"] = n_test
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        out = subprocess.run(dvc + ["repro"], cwd=project, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Running stage 'data'" in out.stdout
        assert len(log.calls) == 3, log.calls  # DTD archive + split file, FGVC archive: once, on the first run
        assert len(load_coop("FGVCAircraft", root=project / "data" / "coop", split="test").dataset) == 6
        assert sorted(os.listdir(project / "data" / "coop")) == ["dtd", "fgvc_aircraft"]
    assert sorted(os.listdir(tmp_path / "cache")) == ["dtd", "fgvc_aircraft"]
