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
  eurosat/2750/                            + eurosat/split_zhou_EuroSAT.json
  stanford_cars/{cars_train,cars_test}/    + stanford_cars/split_zhou_StanfordCars.json (relpaths from stanford_cars/)
  sun397/SUN397/                           + sun397/split_zhou_SUN397.json
A split_zhou json is {"train"|"val"|"test": [[relpath under the image dir, label, classname], ...]}.
ImageNet has no val split of its own: CoOp uses the 50k val set as both "val" and "test".

Prompts are CoOp's CUSTOM_TEMPLATES (trainers/zsclip.py), one per dataset, and class names get '_' -> ' '
exactly as CoOp does when it formats them. The same datasets through clip_benchmark (its own splits, no
UCF101) are one `resolve(name, protocol)` away.

Where a dataset comes from (materialise): a local `source` DATA root, else the persistent download cache (a DATA
root outside the DVC output, so a rerun of the data stage fetches nothing again), else a download into that
cache. Each dataset is then checked, its images decoded, and staged on its own into dest/<folder>.
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
    index_file: str             # the file the reader reads first: marks a folder as this dataset's


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
    #   ("remove", path)                    delete what an archive left beside the files CoOp reads
    steps: tuple[tuple, ...] = ()
    # Approximate sizes in GB (published archive sizes; extracted = the dataset folder), for the disk check.
    archive_gb: float = 0.0
    extracted_gb: float = 0.0


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

def _spec(name, folder, image_dir, split_file, template, reader=_read_split_json, index_file=None) -> DatasetSpec:
    return DatasetSpec(name, folder, image_dir, split_file, template, reader, index_file or split_file)


COOP_DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    _spec("Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "a photo of a {c}."),
    _spec("OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {c}, a type of pet."),
    _spec("Flowers102", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
          "a photo of a {c}, a type of flower."),
    _spec("Food101", "food-101", "images", "split_zhou_Food101.json", "a photo of {c}, a type of food."),
    _spec("FGVCAircraft", "fgvc_aircraft", "images", None, "a photo of a {c}, a type of aircraft.", _read_aircraft,
          "variants.txt"),
    _spec("DTD", "dtd", "images", "split_zhou_DescribableTextures.json", "{c} texture."),
    _spec("UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {c}."),
    _spec("ImageNet", "imagenet", "images", None, "a photo of a {c}.", _read_imagenet, "classnames.txt"),
    # Beyond the paper, as CoOp's datasets/*.py read them. EuroSAT's split file already holds CoOp's NEW_CNAMES
    # ("Annual Crop Land"): CoOp renamed the classes when it wrote the split and reads names from it, as we do.
    _spec("EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {c}."),
    _spec("StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {c}."),  # relpaths
    _spec("SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {c}."),  # from stanford_cars/
]}
ALIASES = {"OxfordFlowers": "Flowers102", "DescribableTextures": "DTD"}  # CoOp's own DATASET.NAMEs

# clip_benchmark's names for the same datasets (its own splits, not CoOp's); it has no UCF101.
CLIP_BENCHMARK_NAMES = {"Caltech101": "vtab/caltech101", "OxfordPets": "pets", "Flowers102": "flowers",
                        "Food101": "food101", "FGVCAircraft": "fgvc_aircraft", "DTD": "dtd", "ImageNet": "imagenet1k",
                        "EuroSAT": "eurosat", "StanfordCars": "cars", "SUN397": "sun397"}

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
         ("gdrive", "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN", "caltech-101/split_zhou_Caltech101.json")),
        archive_gb=0.14, extracted_gb=0.3),
    "OxfordPets": Source(
        "extract images.tar.gz (https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz) into oxford_pets/ "
        f"and put split_zhou_OxfordPets.json ({_GD.format('1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs')}) in oxford_pets/",
        ("https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",),
        _GD.format("1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs"),
        (("archive", "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz",
          "5c4f3ee8e5d25df40f4fd59a7f44e54c", "oxford_pets"),
         ("gdrive", "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs", "oxford_pets/split_zhou_OxfordPets.json")),
        archive_gb=0.8, extracted_gb=0.8),
    "Flowers102": Source(
        "extract 102flowers.tgz (https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz) into "
        f"oxford_flowers/ (gives jpg/) and put split_zhou_OxfordFlowers.json "
        f"({_GD.format('1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT')}) in oxford_flowers/",
        ("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",),
        _GD.format("1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT"),
        (("archive", "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
          "52808999861908f626f3c1f4e79d11fa", "oxford_flowers"),
         ("gdrive", "1Pp0sRXzZFZq15zVOzKjKBu4A9i01nozT", "oxford_flowers/split_zhou_OxfordFlowers.json")),
        archive_gb=0.35, extracted_gb=0.35),
    "Food101": Source(
        "extract food-101.tar.gz (http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz) in DATA (gives food-101/images/) "
        f"and put split_zhou_Food101.json ({_GD.format('1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl')}) in food-101/",
        ("http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",),
        _GD.format("1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl"),
        (("archive", "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz", "85eeb15f3717b99a5da872d97d918f87", "."),
         ("gdrive", "1QK0tGi096I0Ba6kggatX1ee6dJFIcEJl", "food-101/split_zhou_Food101.json")),
        archive_gb=5.0, extracted_gb=5.0),
    "FGVCAircraft": Source(
        "extract fgvc-aircraft-2013b.tar.gz (https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/"
        "fgvc-aircraft-2013b.tar.gz) and move its data/ folder to DATA/fgvc_aircraft (images/, variants.txt, "
        "images_variant_{train,val,test}.txt); CoOp uses these files, no split json",
        ("https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",),
        None,
        (("archive", "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz",
          None, "."),
         ("move", "fgvc-aircraft-2013b/data", "fgvc_aircraft"),
         ("remove", "fgvc-aircraft-2013b")),  # the archive's README and evaluation scripts: CoOp keeps only data/
        archive_gb=2.8, extracted_gb=2.8),
    "DTD": Source(
        "extract dtd-r1.0.1.tar.gz (https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz) in DATA "
        f"(gives dtd/images/) and put split_zhou_DescribableTextures.json "
        f"({_GD.format('1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x')}) in dtd/",
        ("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",),
        _GD.format("1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x"),
        (("archive", "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",
          "fff73e5086ae6bdbea199a49dfb8a4c1", "."),
         ("gdrive", "1u3_QfB467jqHgNXC00UIzbLZRQCg2S7x", "dtd/split_zhou_DescribableTextures.json")),
        archive_gb=0.63, extracted_gb=0.63),
    "UCF101": Source(
        f"extract CoOp's UCF-101-midframes.zip ({_GD.format('10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O')}) into ucf101/ "
        f"and put split_zhou_UCF101.json ({_GD.format('1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y')}) in ucf101/",
        (_GD.format("10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O"),),
        _GD.format("1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y"),
        (("gdrive", "10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O", "ucf101/UCF-101-midframes.zip"),
         ("gdrive", "1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y", "ucf101/split_zhou_UCF101.json")),
        archive_gb=1.0, extracted_gb=1.0),  # not published: a generous estimate for 13,320 frames
    "ImageNet": Source(
        "extract ILSVRC2012 train and val (https://image-net.org, login required) to imagenet/images/train/<wnid>/ "
        "and imagenet/images/val/<wnid>/ (val sorted into class folders), and put classnames.txt "
        f"({_GD.format('1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF')}) in imagenet/",
        ("https://image-net.org/challenges/LSVRC/2012/2012-downloads.php",),
        _GD.format("1-61f_ol79pViBFDG_IDlUQSwoLcn2XXF"),
        (),  # licence: no automatic download; placed by hand in data.source or data.cache
        extracted_gb=147.0),
    "EuroSAT": Source(
        "extract EuroSAT.zip (RGB, https://madm.dfki.de/files/sentinel/EuroSAT.zip) into eurosat/ (gives 2750/) and "
        f"put split_zhou_EuroSAT.json ({_GD.format('1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o')}) in eurosat/",
        ("https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/"
         "EuroSAT.zip",),  # torchvision's mirror: the DFKI server CoOp links is gone
        _GD.format("1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o"),
        (("archive", "https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
          "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip", "c8fa014336c82ac7804f0398fcb19387", "eurosat"),
         ("gdrive", "1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o", "eurosat/split_zhou_EuroSAT.json")),
        archive_gb=0.09, extracted_gb=0.12),
    "StanfordCars": Source(
        "place the Stanford Cars images as stanford_cars/cars_train/ and stanford_cars/cars_test/ (the official "
        "ai.stanford.edu archives are offline; torchvision no longer downloads them) and put "
        f"split_zhou_StanfordCars.json ({_GD.format('1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT')}) in stanford_cars/",
        ("http://ai.stanford.edu/~jkrause/car196/cars_train.tgz", "http://ai.stanford.edu/~jkrause/car196/cars_test.tgz"),
        _GD.format("1ObCFbaAgVu0I-k_Au-gIUcefirdAuizT"),
        (),  # no reachable official archive: no automatic download
        extracted_gb=1.9),
    "SUN397": Source(
        "extract SUN397.tar.gz (http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz) into sun397/ (gives "
        f"SUN397/) and put split_zhou_SUN397.json ({_GD.format('1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq')}) in sun397/",
        ("http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",),
        _GD.format("1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq"),
        (("archive", "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz", "8ca2778205c41d23104230ba66911c7a",
          "sun397"),
         ("gdrive", "1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq", "sun397/split_zhou_SUN397.json")),
        archive_gb=37.0, extracted_gb=38.0),
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
    # The dataset's own folder: named like it, or holding the file its reader reads first (never just an
    # "images/" folder, which half of CoOp's datasets have).
    if root.name == spec.folder or (root / spec.index_file).is_file():
        return root
    raise DataError(f"{root / spec.folder}: missing; {SOURCES[spec.name].howto} (DATA = {root})")


def load_coop(name: str, *, root: str | Path | None, split: str, transform=None) -> LoadedDataset:
    """Dataset `name` as CoOp splits it: split is "train", "val" or "test"; class names get '_' -> ' '."""
    spec = spec_of(name)
    if split not in SPLITS:
        raise DataError(f"coop/{spec.name}: unknown split {split!r}; CoOp splits are {', '.join(SPLITS)}")
    return _load(spec, dataset_dir(spec.name, root=root), split, transform)


def _load(spec: DatasetSpec, ddir: Path, split: str, transform=None) -> LoadedDataset:
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
# materialise: find a local copy (source, then the download cache) or download into the cache; stage it

def locate(name: str, *, source: str | Path | None, cache: str | Path | None,
           splits: Sequence[str] = ("train", "test")) -> tuple[str, Path] | None:
    """Where dataset `name` is already on disk: ("source", folder) or ("cache", folder); None if nowhere.

    A source folder counts as soon as it is there (it is the user's: any fault in it is reported, never
    papered over by a download); a cache folder only when it loads, so an interrupted download is fetched again.
    """
    spec = spec_of(name)
    if source is not None and Path(source).expanduser().is_dir():
        try:
            return "source", dataset_dir(spec.name, root=Path(source).expanduser())
        except DataError:
            pass
    if cache is not None:
        folder = Path(cache).expanduser() / spec.folder
        if folder.is_dir():
            try:
                _check(spec, folder, splits)
                return "cache", folder
            except DataError:
                pass
    return None


def materialise(name: str, *, dest: str | Path, source: str | Path | None = None, cache: str | Path | None = None,
                download: bool = False, splits: Sequence[str] = ("train", "test")) -> Path:
    """Stage dataset `name` into the DATA root dest, as dest/<folder>/, leaving every other folder of dest alone.

    Taken from `source` (a DATA root holding <folder>/, or <folder> itself), else from the download `cache` (a
    DATA root that outlives the DVC output), else downloaded into `cache` when download=True. Before it lands in
    dest it must load for every split in `splits` with every image decoding. Returns dest.
    """
    spec, dest = spec_of(name), Path(dest)
    found = locate(spec.name, source=source, cache=cache, splits=splits)
    if found is None:
        src = SOURCES[spec.name]
        if not download:
            raise DataError(f"{dest}: coop/{spec.name} needs its files: set a local source root in params, enable "
                            f"download (needs network), or by hand {src.howto} (DATA = {cache or dest})")
        if cache is None:
            raise DataError(f"coop/{spec.name}: download needs a cache folder to download into; set data.cache")
        download_dataset(spec.name, root=Path(cache).expanduser())
        found = "download", Path(cache).expanduser() / spec.folder
    _, origin = found
    created = not dest.exists()
    try:
        # Check and decode the origin first, so an error names the file the user can fix, then copy (never
        # hardlink: DVC makes its outputs read-only through its cache, which would reach the source files).
        check_images(spec, origin, splits)
        from .data import staged_copy

        staged_copy(origin, dest / spec.folder, check=lambda tmp: _check(spec, tmp, splits))
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _check(spec: DatasetSpec, ddir: Path, splits: Sequence[str]) -> list[Path]:
    """Load every split from the dataset folder ddir (layout, split files, every image present); the images."""
    return [Path(p) for s in splits for p, _ in _load(spec, ddir, s).dataset.samples]


def check_images(spec: DatasetSpec, ddir: Path, splits: Sequence[str]) -> None:
    """Every image of `splits` in the dataset folder ddir is there and decodes; else the first bad one, named."""
    from .data import verify_images

    verify_images(dict.fromkeys(_check(spec, ddir, splits)),  # train/val/test may share files: decode once
                  fix=f"re-extract it ({SOURCES[spec.name].howto})")


def download_dataset(name: str, *, root: str | Path) -> Path:
    """Run SOURCES[name].steps into the DATA root `root` (official archives + CoOp's Google-Drive files).

    Needs network; the Google-Drive files also need `gdown` (the `paper` extra). ImageNet and StanfordCars have
    no automatic download. Straight into root, no temp dir: root is the persistent download cache, the archives
    are large and torchvision verifies them by md5 itself.
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
            elif kind == "remove":
                shutil.rmtree(root / args[0], ignore_errors=True)
            else:
                raise ValueError(f"unknown download step {kind!r}")
    except (RuntimeError, OSError) as e:  # no network, no gdown, bad checksum; URLError is an OSError
        raise DataError(f"{root}: could not download {spec.name} ({type(e).__name__}: {e}); without network, "
                        f"{source.howto} (DATA = {root}) and rerun") from e
    return root
