"""The paper's eight datasets read the way CoOp (KaiyangZhou/CoOp, datasets/*.py, on Dassl) reads them.

Layout, under one DATA root (CoOp's DATASET.ROOT), one folder per dataset:
  caltech-101/101_ObjectCategories/        + caltech-101/split_zhou_Caltech101.json
  oxford_pets/images/                      + oxford_pets/split_zhou_OxfordPets.json
  oxford_flowers/jpg/                      + oxford_flowers/split_zhou_OxfordFlowers.json
  food-101/images/                         + food-101/split_zhou_Food101.json
  fgvc_aircraft/images/                    + variants.txt, images_variant_{train,val,test}.txt (the archive's data/)
  dtd/images/                              + dtd/split_zhou_DescribableTextures.json
  ucf101/UCF-101-midframes/                + ucf101/split_zhou_UCF101.json
  imagenet/images/{train,val}/<wnid>/      + imagenet/classnames.txt ("wnid class name" lines)
A split_zhou json is {"train"|"val"|"test": [[relpath under the image dir, label, classname], ...]}.
ImageNet has no val split of its own: CoOp uses the 50k val set as both "val" and "test".

Prompts are CoOp's CUSTOM_TEMPLATES (trainers/zsclip.py), one per dataset, and class names get '_' -> ' '
exactly as CoOp does when it formats them. The same datasets through clip_benchmark (its own splits, no
UCF101) are one `resolve(name, protocol)` away.
"""

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from clipprune.data import DataError, LoadedDataset, _load_rgb

SPLITS = ("train", "val", "test")
PROTOCOLS = ("coop", "clip_benchmark")


@dataclass(frozen=True)
class DatasetSpec:
    name: str                   # our name; load_dataset takes "coop/<name>"
    folder: str                 # the dataset's folder under the DATA root (CoOp's dataset_dir)
    image_dir: str              # image folder inside `folder`; split relpaths are relative to it
    split_file: str | None      # split_zhou json inside `folder`; None where the reader uses other files
    template: str               # CoOp's CUSTOM_TEMPLATES entry, in our "{c}" convention
    reader: Callable            # (spec, dataset_dir, split) -> ([(image path, label)], raw classnames by label)


@dataclass(frozen=True)
class Source:
    howto: str                  # one line: what to place where, relative to the DATA root (error messages use it)
    archives: tuple[str, ...]   # official download URL(s) of the images
    split_url: str | None       # where the split/class-name file comes from (CoOp DATASETS.md Google-Drive link)
    # What download_dataset() does, in order, paths relative to the DATA root; empty = no automatic download:
    #   ("archive", url, md5 | None, into)  download and extract url into `into`
    #   ("extract", archive, into)          extract an archive that an earlier step unpacked
    #   ("gdrive", file_id, path)           Google-Drive file to `path` (extracted there if it is a .zip); needs gdown
    #   ("move", src, dst)                  rename a folder
    steps: tuple[tuple, ...] = ()


def clean_classname(name: str) -> str:
    """CoOp's only cleaning, done where it formats prompts (zsclip.py, coop.py): '_' -> ' '."""
    return name.replace("_", " ")


# ----------------------------------------------------------------------------------------------------------
# readers

def _read_split_json(spec: DatasetSpec, ddir: Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """OxfordPets.read_split: relpaths joined onto the image dir; class names come from the file itself."""
    path = ddir / spec.split_file
    if not path.is_file():
        raise DataError(f"{path}: CoOp split file missing; download {spec.split_file} from "
                        f"{SOURCES[spec.name].split_url} and put it there")
    try:
        table = json.loads(path.read_text())
        entries = {s: [(str(p), int(y), str(c)) for p, y, c in table[s]] for s in SPLITS}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a CoOp split file ({type(e).__name__}: {e}); expected "
                        f'{{"train"|"val"|"test": [[relpath, label, classname], ...]}}; re-download it') from e
    # Dassl names classes from the train split; all three splits are read so a class absent from train
    # still has a name, and a label named two ways is caught.
    names: dict[int, str] = {}
    for s in SPLITS:
        for p, y, c in entries[s]:
            if names.setdefault(y, c) != c:
                raise DataError(f"{path}: label {y} is named both {names[y]!r} and {c!r} ({s} entry {p}); "
                                f"re-download the split file")
    classnames = _by_label(names, where=path)
    image_dir = ddir / spec.image_dir
    return [(image_dir / p, y) for p, y, _ in entries[split]], classnames


def _read_aircraft(spec: DatasetSpec, ddir: Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """FGVCAircraft.read_data: variants.txt gives the label order; lines are "<image id> <variant name>"."""
    variants = ddir / "variants.txt"
    listing = ddir / f"images_variant_{split}.txt"
    for f in (variants, listing):
        if not f.is_file():
            raise DataError(f"{f}: missing; {SOURCES[spec.name].howto}")
    classnames = [line.strip() for line in variants.read_text().splitlines() if line.strip()]
    label_of = {c: i for i, c in enumerate(classnames)}
    samples = []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        image_id, _, variant = line.strip().partition(" ")
        if variant not in label_of:
            raise DataError(f"{listing}: line {n} has variant {variant!r}, which is not in {variants}; "
                            f"re-extract both from the same archive")
        samples.append((ddir / spec.image_dir / f"{image_id}.jpg", label_of[variant]))
    return samples, classnames


def _read_imagenet(spec: DatasetSpec, ddir: Path, split: str) -> tuple[list[tuple[Path, int]], list[str]]:
    """ImageNet.read_data: one folder per wnid, label = position in sorted wnid order; "test" = "val" = val set."""
    names_file = ddir / "classnames.txt"
    if not names_file.is_file():
        raise DataError(f"{names_file}: missing; download classnames.txt from {SOURCES[spec.name].split_url} "
                        f"and put it there")
    names = {}
    for line in names_file.read_text().splitlines():
        if line.strip():
            wnid, _, classname = line.strip().partition(" ")
            names[wnid] = classname
    wnids = sorted(names)  # CoOp enumerates the sorted class folders; for the full set that is the same order
    split_dir = ddir / spec.image_dir / ("train" if split == "train" else "val")
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: missing; extract ILSVRC2012 {split_dir.name} there as one <wnid>/ folder "
                        f"per class (the val set sorted into class folders)")
    folders = sorted(f.name for f in split_dir.iterdir() if f.is_dir())
    unknown, absent = sorted(set(folders) - set(names)), [w for w in wnids if w not in set(folders)]
    if unknown or absent:  # a missing class would silently shift every later label
        raise DataError(f"{split_dir}: class folders do not match {names_file} "
                        f"(not listed: {unknown[:3]}, no folder: {absent[:3]}); fix the folders or classnames.txt")
    samples = []
    for y, wnid in enumerate(wnids):
        for f in sorted((split_dir / wnid).iterdir()):
            if not f.name.startswith("."):  # Dassl's listdir_nohidden
                samples.append((f, y))
    return samples, [names[w] for w in wnids]


def _by_label(names: dict[int, str], *, where: Path) -> list[str]:
    missing = sorted(set(range(max(names, default=-1) + 1)) - set(names))
    if not names or missing or min(names) < 0:
        raise DataError(f"{where}: labels must be 0..C-1 with a name each; labels {missing[:5]} have no entry")
    return [names[y] for y in range(len(names))]


# ----------------------------------------------------------------------------------------------------------
# registries (data)

def _spec(name, folder, image_dir, split_file, template, reader=_read_split_json) -> DatasetSpec:
    return DatasetSpec(name, folder, image_dir, split_file, template, reader)


COOP_DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    _spec("Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "a photo of a {c}."),
    _spec("OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {c}, a type of pet."),
    _spec("Flowers102", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
          "a photo of a {c}, a type of flower."),
    _spec("Food101", "food-101", "images", "split_zhou_Food101.json", "a photo of {c}, a type of food."),
    _spec("FGVCAircraft", "fgvc_aircraft", "images", None, "a photo of a {c}, a type of aircraft.", _read_aircraft),
    _spec("DTD", "dtd", "images", "split_zhou_DescribableTextures.json", "{c} texture."),
    _spec("UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {c}."),
    _spec("ImageNet", "imagenet", "images", None, "a photo of a {c}.", _read_imagenet),
]}
ALIASES = {"OxfordFlowers": "Flowers102", "DescribableTextures": "DTD"}  # CoOp's own DATASET.NAMEs

# clip_benchmark's names for the same datasets (its own splits, not CoOp's); it has no UCF101.
CLIP_BENCHMARK_NAMES = {"Caltech101": "vtab/caltech101", "OxfordPets": "pets", "Flowers102": "flowers",
                        "Food101": "food101", "FGVCAircraft": "fgvc_aircraft", "DTD": "dtd", "ImageNet": "imagenet1k"}

_GD = "https://drive.google.com/file/d/{}/view"  # CoOp DATASETS.md links; ids below are the same files
SOURCES: dict[str, Source] = {
    "Caltech101": Source(
        "extract caltech-101.zip (https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip) in DATA, then "
        "caltech-101/101_ObjectCategories.tar.gz inside caltech-101/, and put split_zhou_Caltech101.json "
        f"({_GD.format('1hyarUivQE36mY6jSomru6Fjd-JzwcCzN')}) in caltech-101/",
        ("https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",),
        _GD.format("1hyarUivQE36mY6jSomru6Fjd-JzwcCzN"),
        (("archive", "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
          "3138e1922a9193bfa496528edbbc45d0", "."),
         ("extract", "caltech-101/101_ObjectCategories.tar.gz", "caltech-101"),
         ("gdrive", "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN", "caltech-101/split_zhou_Caltech101.json"))),
    "OxfordPets": Source(
        "extract images.tar.gz (https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz) into oxford_pets/ "
        f"and put split_zhou_OxfordPets.json ({_GD.format('1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs')}) in oxford_pets/",
        ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",),
        _GD.format("1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs"),
        (("archive", "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
          "5c4f3ee8e5d25df40f4fd59a7f44e54c", "oxford_pets"),
         ("gdrive", "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs", "oxford_pets/split_zhou_OxfordPets.json"))),
    "Flowers102": Source(
        "extract 102flowers.tgz (https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz) into "
        f"oxford_flowers/ (gives jpg/) and put split_zhou_OxfordFlowers.json "
        f"({_GD.format('1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT')}) in oxford_flowers/",
        ("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",),
        _GD.format("1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT"),
        (("archive", "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
          "52808999861908f626f3c1f4e79d11fa", "oxford_flowers"),
         ("gdrive", "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT", "oxford_flowers/split_zhou_OxfordFlowers.json"))),
    "Food101": Source(
        "extract food-101.tar.gz (http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz) in DATA (gives food-101/images/) "
        f"and put split_zhou_Food101.json ({_GD.format('1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl')}) in food-101/",
        ("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",),
        _GD.format("1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl"),
        (("archive", "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", "85eeb15f3717b99a5da872d97d918f87", "."),
         ("gdrive", "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl", "food-101/split_zhou_Food101.json"))),
    "FGVCAircraft": Source(
        "extract fgvc-aircraft-2013b.tar.gz (https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/"
        "fgvc-aircraft-2013b.tar.gz) and move its data/ folder to DATA/fgvc_aircraft (images/, variants.txt, "
        "images_variant_{train,val,test}.txt); CoOp uses these files, no split json",
        ("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",),
        None,
        (("archive", "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
          None, "."),
         ("move", "fgvc-aircraft-2013b/data", "fgvc_aircraft"))),
    "DTD": Source(
        "extract dtd-r1.0.1.tar.gz (https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz) in DATA "
        f"(gives dtd/images/) and put split_zhou_DescribableTextures.json "
        f"({_GD.format('1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x')}) in dtd/",
        ("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",),
        _GD.format("1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"),
        (("archive", "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
          "fff73e5086ae6bdbea199a49dfb8a4c1", "."),
         ("gdrive", "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x", "dtd/split_zhou_DescribableTextures.json"))),
    "UCF101": Source(
        f"extract CoOp's UCF-101-midframes.zip ({_GD.format('10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O')}) into ucf101/ "
        f"and put split_zhou_UCF101.json ({_GD.format('1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y')}) in ucf101/",
        (_GD.format("10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O"),),
        _GD.format("1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y"),
        (("gdrive", "10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O", "ucf101/UCF-101-midframes.zip"),
         ("gdrive", "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y", "ucf101/split_zhou_UCF101.json"))),
    "ImageNet": Source(
        "extract ILSVRC2012 train and val (https://image-net.org, login required) to imagenet/images/train/<wnid>/ "
        "and imagenet/images/val/<wnid>/ (val sorted into class folders), and put classnames.txt "
        f"({_GD.format('1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF')}) in imagenet/",
        ("https://image-net.org/challenges/LSVRC/2012/2012-downloads.php",),
        _GD.format("1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF"),
        ()),  # licence: no automatic download
}


def spec_of(name: str) -> DatasetSpec:
    """The registry entry for `name` (ours, or CoOp's OxfordFlowers / DescribableTextures)."""
    name = ALIASES.get(name, name)
    if name not in COOP_DATASETS:
        raise DataError(f"coop/{name}: unknown CoOp dataset; use one of {', '.join(COOP_DATASETS)}")
    return COOP_DATASETS[name]


def resolve(name: str, protocol: str = "coop") -> str:
    """The load_dataset name of paper dataset `name` under `protocol`: "coop/<Name>" or clip_benchmark's name."""
    spec = spec_of(name)
    if protocol == "coop":
        return f"coop/{spec.name}"
    if protocol == "clip_benchmark":
        if spec.name not in CLIP_BENCHMARK_NAMES:
            raise DataError(f"{spec.name}: clip_benchmark has no {spec.name}; use protocol coop for it")
        return CLIP_BENCHMARK_NAMES[spec.name]
    raise DataError(f"{name}: unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")


# ----------------------------------------------------------------------------------------------------------
# loading

class CoopDataset(torch.utils.data.Dataset):
    """(transform(PIL image) or the PIL image, label) for a list of (path, label); .targets, .classes, .templates."""

    def __init__(self, samples: Sequence[tuple[Path, int]], *, classes: list[str], templates: list[str],
                 transform=None):
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.targets = [y for _, y in self.samples]
        self.classes = classes
        self.templates = templates
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, y = self.samples[i]
        image = _load_rgb(path)  # DataError naming the file when it is unreadable
        return (self.transform(image) if self.transform is not None else image), y


def dataset_dir(name: str, *, root: str | Path | None) -> Path:
    """The dataset's folder: root is the DATA folder (holding <folder>/) or that folder itself."""
    spec = spec_of(name)
    if root is None:
        raise DataError(f"coop/{spec.name}: no data root given; set the dataset's root in params to a folder "
                        f"holding {spec.folder}/")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: CoOp data root for {spec.name} does not exist; create it and "
                        f"{SOURCES[spec.name].howto} (DATA = {root})")
    if (root / spec.folder).is_dir():
        return root / spec.folder
    if root.name == spec.folder or (root / spec.image_dir).is_dir():
        return root
    raise DataError(f"{root / spec.folder}: missing; {SOURCES[spec.name].howto} (DATA = {root})")


def load_coop(name: str, *, root: str | Path | None, split: str, transform=None) -> LoadedDataset:
    """Dataset `name` as CoOp splits it: split is "train", "val" or "test"; class names get '_' -> ' '."""
    spec = spec_of(name)
    if split not in SPLITS:
        raise DataError(f"coop/{spec.name}: unknown split {split!r}; CoOp splits are {', '.join(SPLITS)}")
    ddir = dataset_dir(spec.name, root=root)
    if not (ddir / spec.image_dir).is_dir():
        raise DataError(f"{ddir / spec.image_dir}: image folder missing; {SOURCES[spec.name].howto}")
    samples, classnames = spec.reader(spec, ddir, split)
    if not samples:
        raise DataError(f"{ddir}: {spec.name} split {split!r} has no samples; re-download its split file")
    # Dassl checks every file when it builds the split; do the same so a partial extraction fails here,
    # up front, and not hours into an evaluation.
    missing = [p for p, _ in samples if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: image missing ({len(missing)} of {len(samples)} in split {split!r}); "
                        f"{SOURCES[spec.name].howto}")
    bad = [y for _, y in samples if not 0 <= y < len(classnames)]
    if bad:
        raise DataError(f"{ddir}: split {split!r} has label {bad[0]} but only {len(classnames)} classes; "
                        f"re-download the split files")
    classes = [clean_classname(c) for c in classnames]
    ds = CoopDataset(samples, classes=classes, templates=[spec.template], transform=transform)
    return LoadedDataset(ds, list(classes), [spec.template])


# ----------------------------------------------------------------------------------------------------------
# materialise: copy a local copy, or download

def materialise(name: str, *, dest: str | Path, source: str | Path | None = None, download: bool = False,
                splits: Sequence[str] = ("train", "test")) -> Path:
    """Make dest a DATA root holding dataset `name` in CoOp's layout (dest/<folder>/); returns dest.

    With `source` (a DATA root holding <folder>/, or <folder> itself) it copies; with download=True it runs
    download_dataset(); either way the result must load for every split in `splits` before it lands in dest.
    """
    spec = spec_of(name)
    dest = Path(dest)
    if source is not None:
        src = dataset_dir(spec.name, root=source)
        # Copy, never hardlink (as data.materialise): DVC makes its outputs read-only through the cache.
        from .data import staged_copy

        return staged_copy(src, dest, into=spec.folder, check=lambda tmp: _check(spec, tmp, splits))
    if not download:
        raise DataError(f"{dest}: coop/{spec.name} needs its files: set a local source root in params, enable "
                        f"download (needs network), or by hand {SOURCES[spec.name].howto} (DATA = {dest})")
    try:
        _check(spec, dest, splits)  # already there (a rerun): nothing to fetch
        return dest
    except DataError:
        pass
    download_dataset(spec.name, root=dest)
    _check(spec, dest, splits)
    return dest


def _check(spec: DatasetSpec, root: Path, splits: Sequence[str]) -> None:
    for s in splits:  # a layout that does not load must not become a DVC output
        load_coop(spec.name, root=root, split=s)


def download_dataset(name: str, *, root: str | Path) -> Path:
    """Run SOURCES[name].steps into the DATA root `root` (official archives + CoOp's Google-Drive files).

    Needs network; the Google-Drive files also need `gdown`. ImageNet has no automatic download (licence).
    Straight into root, no temp dir: the archives are large and torchvision verifies them by md5 itself.
    """
    from torchvision.datasets import utils as tvu  # lazy; tests replace its download functions

    spec, root = spec_of(name), Path(root)
    source = SOURCES[spec.name]
    if not source.steps:
        raise DataError(f"{root}: {spec.name} cannot be downloaded automatically; {source.howto} (DATA = {root})")
    root.mkdir(parents=True, exist_ok=True)
    try:
        for kind, *args in source.steps:
            if kind == "archive":
                url, md5, into = args
                tvu.download_and_extract_archive(url, download_root=str(root / into), md5=md5, remove_finished=True)
            elif kind == "extract":
                archive, into = args
                tvu.extract_archive(str(root / archive), str(root / into), remove_finished=True)
            elif kind == "gdrive":
                file_id, path = args
                path = root / path
                tvu.download_file_from_google_drive(file_id, str(path.parent), path.name)
                if path.suffix == ".zip":
                    tvu.extract_archive(str(path), str(path.parent), remove_finished=True)
            elif kind == "move":
                src, dst = args
                shutil.rmtree(root / dst, ignore_errors=True)
                (root / src).rename(root / dst)
            else:
                raise ValueError(f"unknown download step {kind!r}")
    except (RuntimeError, OSError) as e:  # no network, no gdown, bad checksum; URLError is an OSError
        raise DataError(f"{root}: could not download {spec.name} ({type(e).__name__}: {e}); without network, "
                        f"{source.howto} (DATA = {root}) and rerun") from e
    return root
