"""What the DVC stages share: where things live, which datasets share images, how the trained CLIP loads.

Stages stay thin (stages/*.py): read params, call the library, write outputs atomically. The conventions
they must agree on live here, once.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .config import DataParams, GoldenParams, ModelParams
from .errors import ClipPruneError
from .golden import NEEDS_CLASSIFIER

MODELS = Path("models")
RANKINGS = Path("rankings")
REPORTS = Path("reports")
CLIP_CKPT = MODELS / "clip.pt"


def safe_name(name: str) -> str:
    """A dataset name as a file name: synth/shape -> synth-shape."""
    return name.replace("/", "-")


def dataset_root(data: DataParams, name: str) -> Path:
    """Where the data stage puts dataset `name`: the synthetic tasks share one world at data.root."""
    if name.startswith("synth/"):
        return Path(data.root)
    if name.startswith("coop/"):
        return Path(data.root)  # a CoOp DATA root holds every dataset folder
    return Path(data.root) / safe_name(name)


def ranking_groups(data: DataParams, golden: GoldenParams) -> dict[str, str]:
    """Ranking key -> the dataset whose images it ranks.

    The synthetic tasks share their images. A score that reads no task (no label, no classifier) ranks an image
    the same way for every task, and `golden.joint` sums a score over every task: then one ranking (and one
    predictor) serves them all. Otherwise each dataset gets its own.
    """
    synth = [d for d in data.datasets if d.startswith("synth/")]
    groups = {}
    if synth and (golden.joint or golden.score not in NEEDS_CLASSIFIER):
        groups["synth"] = synth[0]
    for d in data.datasets:
        if d not in synth or "synth" not in groups:
            groups[safe_name(d)] = d
    return groups


def group_of(data: DataParams, golden: GoldenParams, dataset: str) -> str:
    for key, name in ranking_groups(data, golden).items():
        if name == dataset or (key == "synth" and dataset.startswith("synth/")):
            return key
    raise ClipPruneError(f"dataset {dataset!r} has no ranking group")


def read_report(name: str, *, stage: str) -> dict:
    """reports/<name> written by an upstream stage; one clear error when that stage has not run."""
    import json

    path = REPORTS / name
    if not path.is_file():
        raise ClipPruneError(f"missing {path}: run the {stage} stage first (dvc repro {stage})")
    return json.loads(path.read_text())


def ranking_path(key: str, split: str) -> Path:
    return RANKINGS / f"{key}-{split}.pt"


def load_clip(model: ModelParams, *, device: str = "cpu"):
    """The pipeline's CLIP (models/clip.pt, written by the pretrain stage): (model, preprocess, tokenizer)."""
    from .model import build_model

    if not CLIP_CKPT.is_file():
        raise ClipPruneError(f"no trained model at {CLIP_CKPT}: run the pretrain stage first (dvc repro pretrain)")
    return build_model(model.arch, pretrained=str(CLIP_CKPT), device=device)


def file_digest(path: str | Path, *, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def ranked_indices(dataset, cap: int, *, sample: str, seed: int) -> list[int] | None:
    """Which images of `dataset` the golden stage ranks when `cap` is below its size (None: all of them, in order):
    the first `cap`, or `cap` drawn per class (golden.train_sample: CoOp and ImageNet train lists are sorted by
    class, so a prefix would rank a few classes only)."""
    from .data import dataset_labels, stratified_indices

    if cap >= len(dataset):
        return None
    if sample == "stratified":
        return stratified_indices(dataset_labels(dataset), cap, seed=seed)
    return list(range(cap))


def dataset_fingerprint(name: str, split: str, dataset) -> str:
    """Cheap identity of a dataset as the model sees it: name, split, size, first and last images."""
    h = hashlib.sha256(f"{name}|{split}|{len(dataset)}".encode())
    for i in (0, len(dataset) - 1):
        h.update(torch.as_tensor(dataset[i][0]).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
