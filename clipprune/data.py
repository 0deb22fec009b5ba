"""The one data entry point: (dataset, classnames, templates) for every source the harness reads.

Sources, by name:
  synth/<task>   the generated world (clipprune.synth), one attribute task
  wds/<name>     local webdataset shards in clip_benchmark's layout, read by clip_benchmark itself
  folder         root/<split>/<class_dir>/*.jpg|png (+ optional classnames.txt, templates.txt)
  coop/<Name>    the paper's datasets with CoOp's splits and prompts (clipprune.coop), root = CoOp's DATA folder
  <other>        any clip_benchmark dataset name (cifar10, pets, vtab/caltech101, ...)

Every input problem (missing root, empty dataset, unknown name, corrupt image) raises DataError with a
one-line message that names the path and says what to do.
"""

import contextlib
import io
import os
import shutil
import tarfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from clipprune.errors import ClipPruneError

DEFAULT_TEMPLATES = ["a photo of a {c}."]
WDS_META = ("classnames.txt", "zeroshot_classification_templates.txt")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's + wds's


class DataError(ClipPruneError):
    """A dataset that cannot be read as asked; the message is one line naming the path and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the wrapped error said


@dataclass
class LoadedDataset:
    dataset: torch.utils.data.Dataset  # map-style, or an IterableDataset for wds/ (no len, no indexing)
    classnames: list[str]
    templates: list[str]
    _transform: object = None  # kept for indexable(): the stream is re-read untransformed
    _raw: object = None  # () -> [(PIL image, label)] for streams

    def indexable(self) -> torch.utils.data.Dataset:
        """A map-style view (golden search, predictor and tuning index images by position).

        Streams (wds/) are read once into memory as decoded images, in file order — the order evaluation
        streams them in, so rankings stay aligned — and transformed on access.
        """
        if not self.iterable:
            return self.dataset
        return InMemoryDataset(self._raw(), transform=self._transform, classes=self.classnames, templates=self.templates)

    @property
    def iterable(self) -> bool:
        return isinstance(self.dataset, torch.utils.data.IterableDataset)

    def loader(self, *, batch_size: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
        """An in-order DataLoader of (images, labels) batches, built the way clip_benchmark builds it."""
        if self.iterable:
            # webdataset batches inside the pipeline (clip_benchmark's cli does the same). With workers, each
            # worker reads whole shards, so batch order interleaves shards; num_workers=0 keeps file order.
            return torch.utils.data.DataLoader(self.dataset.batched(batch_size), batch_size=None,
                                               shuffle=False, num_workers=num_workers)
        return torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, shuffle=False,
                                           num_workers=num_workers)


def load_dataset(name: str, *, root: str | Path | None, split: str, transform=None,
                 download: bool = False) -> LoadedDataset:
    """Build the dataset `name` from `root` for `split`; see the module docstring for the names."""
    if name.startswith("synth/"):
        return _load_synth(name.split("/", 1)[1], root=_existing_root(name, root), split=split, transform=transform)
    if name.startswith("wds/"):
        root = _existing_root(name, root)
        check_wds_root(root, split=split)
        def build(t):
            ds = _build_clip_benchmark(name, root=root, split=split, transform=t, download=False)
            # A stage after decoding turns webdataset's opaque DecodingError into a DataError naming shard and key.
            return ds.compose(_reraise_decoding_errors)

        ds = build(transform)
        return LoadedDataset(ds, list(ds.classes), list(ds.templates), _transform=transform,
                             _raw=lambda: [(img, int(y)) for img, y in build(_identity)])
    if name == "folder":
        return _load_folder(_existing_root(name, root), split=split, transform=transform)
    if name.startswith("coop/"):
        from clipprune.coop import load_coop  # lazy: coop imports this module; its errors say what goes where

        return load_coop(name.split("/", 1)[1], root=root, split=split, transform=transform)
    if name != "dummy":  # the one clip_benchmark dataset that reads no files
        if root is None or not download:
            root = _existing_root(name, root)
    ds = _build_clip_benchmark(name, root=root or ".", split=split, transform=transform, download=download)
    if not isinstance(ds, torch.utils.data.IterableDataset) and hasattr(ds, "__len__") and len(ds) == 0:
        raise DataError(f"{root}: {name} split {split!r} has no samples; check the root or re-download it")
    return LoadedDataset(ds, list(ds.classes), list(ds.templates))


def _identity(x):
    return x


class InMemoryDataset(torch.utils.data.Dataset):
    """(image, label) pairs held in memory, transformed on access; `.targets`, `.classes`, `.templates`."""

    def __init__(self, samples: list, *, transform=None, classes: list[str], templates: list[str]):
        if not samples:
            raise DataError("the dataset stream has no samples")
        self.samples, self.transform = samples, transform
        self.targets = [y for _, y in samples]
        self.classes, self.templates = list(classes), list(templates)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img, y = self.samples[i]
        return (self.transform(img) if self.transform else img), y


def _existing_root(name: str, root: str | Path | None) -> Path:
    if root is None:
        raise DataError(f"{name}: no data root given; set the dataset's root in params (e.g. data/<name>)")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data root for {name} does not exist; run the data stage (dvc repro data) "
                        f"or place the dataset there")
    return root


def _load_synth(task: str, *, root: Path, split: str, transform) -> LoadedDataset:
    from clipprune.synth import SynthTaskDataset  # lazy: the synthetic world pulls in nothing else here

    try:
        ds = SynthTaskDataset(root, split=split, task=task, transform=transform)
    except (FileNotFoundError, ValueError) as e:  # synth's own messages already name the file and the fix
        raise DataError(f"{root}: {e}") from e
    if len(ds) == 0:
        raise DataError(f"{root}: synthetic split {split!r} is empty; regenerate it with a positive n_{split}")
    return LoadedDataset(ds, list(ds.classes), list(ds.templates))


def check_wds_root(root: str | Path, *, split: str) -> int:
    """Check clip_benchmark's webdataset layout for `split` up front; returns the number of shards."""
    root = Path(root)
    nshards_file = root / split / "nshards.txt"
    if not nshards_file.is_file():
        raise DataError(f"{nshards_file}: missing; a wds root needs <root>/{split}/nshards.txt and "
                        f"<root>/{split}/0.tar .. N-1.tar (clip_benchmark_export_wds writes them)")
    try:
        nshards = int(nshards_file.read_text().strip())
    except ValueError:
        raise DataError(f"{nshards_file}: not an integer; write the number of .tar shards in it") from None
    shards = [root / split / f"{i}.tar" for i in range(nshards)]
    missing = [s.name for s in shards if not s.is_file()]
    if nshards < 1 or missing:
        raise DataError(f"{root / split}: nshards.txt says {nshards} but shards {missing or 'none'} are missing; "
                        f"copy the .tar files there or fix nshards.txt")
    try:
        with tarfile.open(shards[0]) as tar:
            empty = tar.next() is None
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{shards[0]}: unreadable tar ({e}); re-copy or re-export the shard") from e
    if empty:
        raise DataError(f"{shards[0]}: empty shard, the {split} split has no samples; re-export the dataset")
    for meta in WDS_META:
        if not (root / meta).is_file():
            raise DataError(f"{root / meta}: missing; zero-shot needs it (one entry per line)")
    kind = root / "dataset_type.txt"
    if kind.is_file() and kind.read_text().strip().lower() not in ("", "classification"):
        raise DataError(f"{kind}: says {kind.read_text().strip()!r}; only classification wds datasets are supported")
    return nshards


def _reraise_decoding_errors(src):
    from webdataset.autodecode import DecodingError

    try:
        yield from src
    except DecodingError as e:
        raise DataError(f"{e.url}: cannot decode {e.k!r} of sample {e.key!r}; re-export that shard") from e


def _build_clip_benchmark(name: str, *, root: str | Path, split: str, transform, download: bool):
    from clip_benchmark.datasets.builder import build_dataset

    try:
        with warnings.catch_warnings():
            # shardshuffle=None means "no shard shuffling" (file order is kept); webdataset still warns on it.
            warnings.filterwarnings("ignore", message=r"WebDataset\(shardshuffle=")
            return build_dataset(name, root=str(root), transform=transform, split=split, download=download)
    except ValueError as e:
        if "Unsupported dataset" in str(e):
            raise DataError(f"{root}: unknown dataset name {name!r}; use synth/<task>, wds/<name>, folder, "
                            f"or a clip_benchmark name such as cifar10") from e
        raise DataError(f"{root}: cannot build {name} split {split!r}: {e}") from e
    except (RuntimeError, OSError, AssertionError) as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{root}: cannot build {name} split {split!r} ({e}); place the files there or run "
                        f"the data stage with download enabled and network access") from e


def _load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader, failing with the file's path instead of a bare PIL error."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncated/garbage files through all three
        raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e}); replace or delete it") from e


def _load_folder(root: Path, *, split: str, transform) -> LoadedDataset:
    from torchvision.datasets import ImageFolder

    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: split folder missing; expected {root}/{split}/<class_dir>/*.jpg|png")
    try:
        ds = ImageFolder(str(split_dir), transform=transform, loader=_load_rgb)
    except FileNotFoundError as e:  # no class dirs, or a class dir without images
        raise DataError(f"{split_dir}: {e}; put images under {split_dir}/<class_dir>/") from e
    classnames = [d.replace("_", " ") for d in ds.classes]
    if (root / "classnames.txt").is_file():
        classnames = _read_lines(root / "classnames.txt")
        if len(classnames) != len(ds.classes):
            raise DataError(f"{root / 'classnames.txt'}: {len(classnames)} names for {len(ds.classes)} class "
                            f"folders; write one name per line in sorted class-folder order")
    templates = _read_lines(root / "templates.txt") if (root / "templates.txt").is_file() else DEFAULT_TEMPLATES
    if not templates:
        raise DataError(f"{root / 'templates.txt'}: empty; write one template with {{c}} per line or delete it")
    return LoadedDataset(ds, classnames, list(templates))


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def dataset_labels(dataset: torch.utils.data.Dataset) -> list[int]:
    """Labels of a dataset, read from .targets/.labels/._labels when present, else by iterating it (slow)."""
    for attr in ("targets", "labels", "_labels"):  # torchvision and clipprune.synth keep them in one of these
        labels = getattr(dataset, attr, None)
        if labels is not None and not isinstance(dataset, torch.utils.data.IterableDataset) \
                and len(labels) == len(dataset):
            return [int(y) for y in labels]
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return [int(y) for _, y in dataset]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def few_shot_indices(labels: Sequence[int], *, shots: int, seed: int, mode: str = "per_class") -> list[int]:
    """`shots` indices per class of the dataset whose labels are `labels` (in dataset order).

    per_class: sorted; a class with fewer than `shots` examples gives all of them. Each class draws from its own
    generator seeded by (seed, class), so a class's pick depends only on its own examples, and the k-shot set is a
    subset of the (k+1)-shot set for the same seed.
    dassl: Dassl's DatasetBase.generate_fewshot_dataset after CoOp's set_random_seed(seed): Python's `random`
    seeded with `seed`, classes in order of first appearance, random.sample(class items, shots), or, for a class
    with fewer, random.choices(items, k=shots) (repeats). Unsorted, in Dassl's order. On a CoOp split list it
    picks the images CoOp's shot_<k>-seed_<seed>.pkl holds (README, "The paper profile", says when).
    """
    if shots < 1:
        raise DataError(f"few-shot: shots must be >= 1, got {shots}; fix tune.shots in params")
    if mode == "dassl":
        import random

        rng = random.Random(seed)  # the same state as random.seed(seed), without touching the global one
        by_label: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_label.setdefault(int(y), []).append(i)
        drawn: list[int] = []
        for items in by_label.values():
            drawn.extend(rng.sample(items, shots) if len(items) >= shots else rng.choices(items, k=shots))
        return drawn
    if mode != "per_class":
        raise DataError(f"few-shot: mode must be 'per_class' or 'dassl', got {mode!r}; fix tune.fewshot in params")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"few-shot: negative label {labels.min()} in the labels; labels must be class indices >= 0")
    picked: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        order = np.random.default_rng([seed, int(c)]).permutation(len(idx))
        picked.extend(idx[order[:shots]].tolist())
    return sorted(picked)


# ----------------------------------------------------------------------------------------------------------
# verification: the data stage decodes what it stages, so a bad file fails there, named, not hours later

def _decode(source) -> None:
    """Decode an image fully (path or file object); raises what PIL raises on a truncated or garbage file."""
    with Image.open(source) as im:
        if im.format == "JPEG":
            im.draft("RGB", (1, 1))  # 1/8-scale IDCT: every entropy-coded byte is still read, ~5x faster
        im.load()


def verify_images(paths: Iterable[str | Path], *, fix: str, threads: int | None = None) -> int:
    """Decode every image in `paths` (in parallel: PIL releases the GIL); the first bad one in order is a
    DataError naming it and `fix`. Returns the number checked."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone relaxed PIL globally: a truncated file would pass unseen
        raise DataError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; unset it so truncated images are caught")
    paths = list(paths)

    def one(path):
        try:
            _decode(path)
            return None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            return f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(threads or min(16, os.cpu_count() or 1)) as pool:
        for path, err in zip(paths, pool.map(one, paths, chunksize=64)):  # map keeps order: the first bad one
            if err is not None:
                raise DataError(f"{path}: cannot decode image ({err}); {fix}")
    return len(paths)


def verify_wds(root: str | Path, *, split: str) -> int:
    """Read every shard of `split` to its end, decoding every image member; returns the number of samples'
    images. A truncated or corrupt shard is one DataError line naming it, never a tarfile traceback."""
    root = Path(root)
    n = 0
    for i in range(check_wds_root(root, split=split)):
        shard = root / split / f"{i}.tar"
        fix = f"re-copy or re-export {shard.name}"
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    data = tar.extractfile(member).read()  # reads to the member's end: truncation raises here
                    if member.name.lower().endswith(IMAGE_EXTS):
                        try:
                            _decode(io.BytesIO(data))
                        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                            raise DataError(f"{shard}: member {member.name} cannot be decoded "
                                            f"({type(e).__name__}: {e}); {fix}") from e
                        n += 1
                end = tar.offset  # where the end-of-archive marker (two zero blocks) must follow
            with open(shard, "rb") as f:  # tarfile stops silently at a shard cut between two members
                f.seek(end)
                marker = f.read(2 * tarfile.BLOCKSIZE)
            if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
                raise DataError(f"{shard}: ends without the tar end-of-archive marker after {end} bytes "
                                f"(truncated); {fix}")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{shard}: truncated or corrupt tar ({type(e).__name__}: {e}); {fix}") from e
    return n


# ----------------------------------------------------------------------------------------------------------
# staging: nothing half-written ever becomes a DVC output

def stratified_indices(labels: Sequence[int], n: int, *, seed: int) -> list[int]:
    """`n` of the indices of `labels`, each class's share proportional to its size, sorted.

    Quotas: floor(n * count / N) per class, the remaining ones to the largest remainders (ties: lower class).
    Within a class, the first `quota` of a permutation from a generator seeded by (seed, class). Every index
    when n >= N. Independent of the order of `labels` (CoOp test lists are sorted by class; a prefix is not).
    """
    labels = np.asarray(labels, dtype=np.int64)
    total = len(labels)
    if n < 1:
        raise DataError(f"a subset of {n} images: the number must be >= 1 (eval.sweep_images, golden.n_train)")
    if n >= total:
        return list(range(total))
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / total
    quota = np.floor(exact).astype(np.int64)
    for i in sorted(range(len(classes)), key=lambda i: (-(exact[i] - quota[i]), classes[i]))[: n - int(quota.sum())]:
        quota[i] += 1
    picked: list[int] = []
    for c, q in zip(classes.tolist(), quota.tolist()):
        idx = np.flatnonzero(labels == c)
        picked.extend(idx[np.random.default_rng([seed, c]).permutation(len(idx))[:q]].tolist())
    return sorted(picked)


def staged_copy(source: Path, dest: Path, *, check) -> Path:
    """Copy `source` to `dest` through `dest.partial`, run `check(partial)`, then rename into place:
    a layout that does not load never becomes a DVC output, and a failed copy leaves nothing behind."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(source, tmp)
        check(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


@contextlib.contextmanager
def staged_dir(dest: str | Path) -> Iterator[Path]:
    """Build a whole output folder as `dest.partial` and rename it onto dest only if the block succeeds:
    the data stage either leaves every dataset staged and checked, or no output at all."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    made = [p for p in (tmp, *tmp.parents) if not p.exists()]  # the folders this creates, deepest first
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        for folder in made:  # tmp and any parent it needed (data/): nothing of this run stays behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def materialise(name: str, *, dest: str | Path, source: str | Path | None = None, cache: str | Path | None = None,
                n_train: int | None = None, n_test: int | None = None, seed: int = 0, download: bool = False,
                splits: Sequence[str] = ("train", "test")) -> Path:
    """Put what dataset `name` needs under `dest` (data/<name>/) for the data stage; returns dest.

    synth*   generate the world (clipprune.synth.write_world) with n_train/n_test/seed.
    wds/*    copy a local clip_benchmark webdataset root `source`, having read every shard to its end.
    folder   copy a local ImageFolder root `source`, having decoded every image.
    coop/*   stage dest/<folder> from `source`, the download `cache`, or a download into it (clipprune.coop).
    other    clip_benchmark's build_dataset(download=True) into `cache` (persistent), then copied to dest.
    """
    dest = Path(dest)
    if name.startswith("synth"):
        from clipprune.synth import write_world

        if n_train is None or n_test is None:
            raise DataError(f"{dest}: the synthetic world needs n_train and n_test; set them in params")
        write_world(dest, n_train=n_train, n_test=n_test, seed=seed)
        return dest
    if name.startswith("wds/") or name == "folder":
        if source is None:
            raise DataError(f"{dest}: {name} needs a local source root to copy from; set it in params")
        source = Path(source)
        if not source.is_dir():
            raise DataError(f"{source}: source root for {name} does not exist; place the dataset there")
        present = [s for s in splits if (source / s).is_dir()]
        if not present:
            raise DataError(f"{source}: none of the splits {list(splits)} is there; expected {source}/<split>/")
        for s in present:  # the source, so an error names the file the user can fix
            if name == "folder":
                samples = load_dataset("folder", root=source, split=s).dataset.samples
                verify_images([p for p, _ in samples], fix="replace or delete it")
            else:
                verify_wds(source, split=s)
        # Copy, never hardlink: DVC moves outputs into its cache and makes them read-only, which through a
        # hardlink would change the (shared, read-only) source files too.
        def check(root: Path) -> None:
            for s in present:
                load_dataset("folder", root=root, split=s) if name == "folder" else check_wds_root(root, split=s)

        return staged_copy(source, dest, check=check)
    if name.startswith("coop/"):
        from clipprune import coop

        return coop.materialise(name.split("/", 1)[1], dest=dest, source=source, cache=cache, download=download,
                                splits=splits)
    if not download:
        raise DataError(f"{dest}: {name} must be downloaded; enable download in params (needs network) or "
                        f"place the files there by hand")
    # Into the persistent cache (DVC deletes dest before every rerun of the data stage), then copied.
    target = Path(cache).expanduser() / "clip_benchmark" / name.replace("/", "-") if cache is not None else dest
    target.mkdir(parents=True, exist_ok=True)
    for s in splits:
        try:
            _build_clip_benchmark(name, root=target, split=s, transform=None, download=True)
        except DataError as e:
            raise DataError(f"{target}: could not download {name} split {s!r} ({e.__cause__ or e}); without "
                            f"network, place its files there as torchvision/clip_benchmark expect and rerun") from e
    if target == dest:
        return dest
    return staged_copy(target, dest, check=lambda tmp: [load_dataset(name, root=tmp, split=s) for s in splits])
