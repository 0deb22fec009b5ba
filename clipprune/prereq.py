"""Everything the data stage needs, checked before it fetches or copies a byte.

A paper run downloads tens of gigabytes; a missing package or a full disk found after that wastes an hour.
`check(data)` looks at the whole `data` section at once (each dataset present locally or downloadable, the
packages its downloads need, free disk for what will be written, writable folders) and returns one line per
missing thing; `require(data)` raises them all together. `python -m stages.data --check-only` runs it alone.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import DataParams
from .errors import ClipPruneError

GB = 1e9
SPLITS = ("train", "test")  # what the data stage stages (and later stages read)


@dataclass
class Plan:
    dataset: str
    origin: str  # generate | source | cache | download | missing
    path: Path | None = None

    def __str__(self) -> str:
        where = {"generate": "generated", "source": f"copied from {self.path}", "cache": f"copied from {self.path}",
                 "download": f"downloaded into {self.path}, then copied", "missing": "MISSING"}[self.origin]
        return f"{self.dataset}: {where}"


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _size_gb(folder: Path) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files) / GB


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.absolute().resolve(), folder.absolute().resolve()
    return path == folder or folder in path.parents


def check(data: DataParams) -> tuple[list[Plan], list[str]]:
    """(where each dataset comes from, one line per missing prerequisite). Touches nothing on disk."""
    from . import coop
    from .data import DataError

    root, cache = Path(data.root), Path(data.cache).expanduser()
    source = Path(data.source).expanduser() if data.source is not None else None
    plans, problems = [], []
    need: dict[Path, list] = {}  # filesystem (an existing folder on it) -> [GB, datasets]
    gdrive: list[str] = []

    def add(folder: Path, gb: float, name: str) -> None:
        fs = _existing_ancestor(folder)
        key = next((k for k in need if os.stat(k).st_dev == os.stat(fs).st_dev), fs)
        need.setdefault(key, [0.0, []])
        need[key][0] += gb
        if name not in need[key][1]:
            need[key][1].append(name)

    if source is not None and not source.is_dir():
        problems.append(f"data.source: {source} does not exist; set it to a folder holding the datasets, or null")
        source = None
    if _inside(cache, root):
        problems.append(f"data.cache: {cache} is inside data.root ({root}), which DVC deletes before every run of "
                        f"the data stage; put the cache outside it (default ~/.cache/clipprune/data)")
    for folder, key in ((root, "data.root"), (cache, "data.cache")):
        if not os.access(_existing_ancestor(folder), os.W_OK):
            problems.append(f"{key}: {folder} is not writable (nearest existing folder "
                            f"{_existing_ancestor(folder)}); choose a folder you can write")

    for name in data.datasets:
        if name.startswith("synth"):
            plans.append(Plan(name, "generate"))
        elif name.startswith("wds/") or name == "folder":
            if source is None:
                problems.append(f"{name}: needs data.source, a local root to copy from; set it in params")
                plans.append(Plan(name, "missing"))
            else:
                plans.append(Plan(name, "source", source))
        elif name.startswith("coop/"):
            try:
                spec = coop.spec_of(name.split("/", 1)[1])
            except DataError as e:
                problems.append(f"data.datasets: {e}")
                continue
            src = coop.SOURCES[spec.name]
            found = coop.locate(spec.name, source=source, cache=cache, splits=SPLITS)
            if found is not None:
                plans.append(Plan(name, *found))
            elif not src.steps:
                problems.append(f"{name}: not found in data.source ({data.source}) nor data.cache ({cache}) and it cannot "
                                f"be downloaded; place it there by hand: {src.howto} (DATA = {source or cache})")
                plans.append(Plan(name, "missing"))
            elif not data.download:
                problems.append(f"{name}: not found in data.source ({data.source}) nor data.cache ({cache}), and "
                                f"data.download is false; set download: true (needs network) or {src.howto} "
                                f"(DATA = {source or cache})")
                plans.append(Plan(name, "missing"))
            else:
                plans.append(Plan(name, "download", cache))
                add(cache, src.archive_gb + src.extracted_gb, name)
                if any(step[0] == "gdrive" for step in src.steps):
                    gdrive.append(name)
            if plans[-1].origin != "missing":  # the copy in data.root, and DVC's cache of that output
                gb = src.extracted_gb if found is None else _size_gb(found[1])  # measured where it is there
                add(root, 2 * gb, name)
        else:  # a clip_benchmark name
            if data.download:
                plans.append(Plan(name, "download", cache / "clip_benchmark"))
            else:
                problems.append(f"{name}: a clip_benchmark dataset is downloaded by the data stage; set "
                                f"data.download: true (needs network), or use wds/<name> with data.source")
                plans.append(Plan(name, "missing"))

    if gdrive and importlib.util.find_spec("gdown") is None:
        problems.append(f"package gdown missing: {', '.join(gdrive)} fetch CoOp's split files from Google Drive "
                        f"through it; pip install -e '.[paper]'")
    for folder, (gb, names) in need.items():
        free = shutil.disk_usage(folder).free / GB
        if gb > free:
            problems.append(f"disk: {folder} has {free:.1f} GB free but {', '.join(names)} need ~{gb:.1f} GB there "
                            f"(archives, extracted files, the copy in data.root and DVC's cache of it); free space "
                            f"or point data.cache / data.root at a larger disk")
    return plans, problems


def require(data: DataParams) -> list[Plan]:
    """check(data), raising every missing prerequisite at once (one line each) before anything is fetched."""
    plans, problems = check(data)
    if problems:
        raise ClipPruneError(f"{len(problems)} data prerequisite(s) missing; nothing was downloaded or copied:\n  "
                             + "\n  ".join(problems))
    return plans
