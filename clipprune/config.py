"""params.yaml as typed sections: one loader that validates, so every stage fails with one clear line.

Each stage reads only the sections it declares in dvc.yaml; the dataclasses below are the schema and the
documentation of every key (params.yaml repeats them as comments).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ClipPruneError


@dataclass
class DataParams:
    datasets: list[str]  # evaluated datasets: synth/<task>, wds/<name>, folder, coop/<Name>, clip_benchmark names
    root: str = "data/synth"  # where the data stage puts (or finds) them
    source: Optional[str] = None  # local root to copy from (wds/folder/coop); None: generate or download
    download: bool = False  # allow the data stage to download (needs a network)
    # Downloads land here, outside data.root (DVC deletes its outputs before each rerun), so a rerun fetches
    # nothing again; also where to place datasets that cannot be downloaded (ImageNet). A CoOp DATA root.
    cache: str = "~/.cache/clipprune/data"
    n_train: int = 20000  # synthetic world: training image-caption pairs
    n_test: int = 2000  # test images: generated (synth) or the first n_test of a larger test split
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_test < 1:
            raise ClipPruneError(f"params: 'data.n_test' must be >= 1 (a cap above the split size keeps it all), got {self.n_test}")


@dataclass
class ModelParams:
    arch: str = "clipprune-tiny"  # open_clip architecture (ours is registered by clipprune.model)
    pretrained: Optional[str] = None  # None: trained by the pretrain stage; else an open_clip tag or a .pt path


@dataclass
class PretrainParams:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 100
    text_freeze_frac: float = 0.5  # text tower lr held at 0 for this fraction of steps (see README)
    seed: int = 0
    threads: int = 2


@dataclass
class PruneParams:
    keep: float = 0.6  # fraction of patch tokens kept (CLS always kept)
    layer: int = 1  # prune at the input of this block (0-based)
    method: str = "predictor+tokens"  # the method the accuracy gate judges


@dataclass
class GoldenParams:
    score: str = "similarity"  # label | max | similarity | fidelity
    unit: int = 1  # k: units are k x k patch blocks
    per_round: int = 16  # m: units eliminated per round (0 = one-shot leave-one-out)
    budget: float = 1.0  # fraction of units ranked by search; the rest follow the last round's scores
    joint: bool = False  # synthetic tasks: rank each image once, the score summed over every task (fidelity, max)
    n_train: int = 4000  # train images ranked (predictor targets); the whole test split is ranked
    batch_size: int = 32
    shard_size: int = 512
    chunk_tokens: int = 4096  # tokens per candidate batch (cache-sized is fastest on CPU; raise on GPU)


@dataclass
class PredictorParams:
    loss: str = "topset_kl"  # topset_kl | listnet | pairwise
    d: int = 16  # channel width after reduction
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0
    # A dataset of data.datasets whose predictor (and pruned-model tokens) every dataset is also evaluated with:
    # the paper's "Ours (ImageNet-trained)" row. Adds the rows predictor@<name> and predictor+tokens@<name>.
    transfer_from: Optional[str] = None


AUGMENTS = ("none", "crop_flip")  # crop_flip: Dassl's random_resized_crop + random_flip (the IVLP/VPT configs)
SCHEDULES = ("cosine", "dassl")  # cosine: per step to 0 after the warm-up | dassl: Dassl's, changed once per epoch
FEWSHOT = ("per_class", "dassl")  # per_class: a generator per (seed, class) | dassl: Dassl's random.sample draw


@dataclass
class TuneParams:
    visual_tokens: int = 4  # learnable visual tokens appended after the pruning point (0: none)
    deep: bool = False  # deep: a fresh set at every block from the pruning layer on
    text_ctx: int = 4  # learnable text context vectors (0: keep the hand-written templates)
    text_init: Optional[str] = "a photo of a"  # phrase the text context starts from (None: random)
    shots: int = 16
    epochs: int = 20
    lr: float = 2e-3
    batch_size: int = 32
    seed: int = 0
    # The recipe (README, "The paper profile"). The defaults are the default profile's: no augmentation, no warm-up.
    augment: str = "none"  # none | crop_flip (training images only; evaluation always sees the model's preprocess)
    warmup_epochs: int = 0  # epochs at the constant warmup_lr before the schedule starts
    warmup_lr: float = 1e-5
    schedule: str = "cosine"  # cosine | dassl (see SCHEDULES)
    weight_decay: float = 0.0  # SGD weight decay (Dassl's default is 5e-4)
    fewshot: str = "per_class"  # per_class | dassl (see FEWSHOT)

    def __post_init__(self) -> None:
        for key, allowed in (("augment", AUGMENTS), ("schedule", SCHEDULES), ("fewshot", FEWSHOT)):
            if getattr(self, key) not in allowed:
                raise ClipPruneError(f"params: 'tune.{key}' must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.warmup_epochs < 0:
            raise ClipPruneError(f"params: 'tune.warmup_epochs' must be >= 0, got {self.warmup_epochs}")


@dataclass
class EvalParams:
    batch_size: int = 250
    methods: list[str] = field(default_factory=lambda: ["full", "random", "cls_attention", "tome", "golden", "predictor",
                                                        "predictor+tokens", "full+tokens"])
    sweep_keeps: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    sweep_methods: list[str] = field(default_factory=lambda: ["random", "cls_attention", "tome", "golden", "predictor"])
    sweep_images: int = 500  # test images per dataset per sweep point: a class-stratified sample drawn with data.seed
    overlay_images: int = 6  # test images drawn with each method's kept patches


@dataclass
class CheckParams:
    max_drop: float = 0.05  # fail when mean acc1 of prune.method is more than this below full
    tolerance: float = 0.01  # fail when any acc1 fell more than this below the committed reports/metrics.json


SECTIONS: dict[str, type] = {"data": DataParams, "model": ModelParams, "pretrain": PretrainParams, "prune": PruneParams,
                             "golden": GoldenParams, "predictor": PredictorParams, "tune": TuneParams,
                             "eval": EvalParams, "check": CheckParams}


def _check_type(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Union:
        return any(_check_type(value, t) for t in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_check_type(v, item) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def section(params: dict, name: str):
    """The validated dataclass for `params[name]`; unknown keys or wrong types are one clear error."""
    cls = SECTIONS[name]
    raw = params.get(name) or {}
    if not isinstance(raw, dict):
        raise ClipPruneError(f"params: section '{name}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in fields:
            raise ClipPruneError(f"params: unknown key '{name}.{key}'; known: {', '.join(sorted(fields))}")
        if not _check_type(value, hints[key]):
            raise ClipPruneError(f"params: '{name}.{key}' must be {_type_name(hints[key])}, got {value!r}")
    try:
        return cls(**raw)
    except TypeError:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise ClipPruneError(f"params: '{name}' needs {', '.join(missing)}") from None


def _type_name(tp: Any) -> str:
    """'float', 'list of str', 'str or null': how a YAML user reads a type."""
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if origin is list:
        return "list of " + _type_name(typing.get_args(tp)[0])
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ClipPruneError(f"no params file at {path}: run from the repository root")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ClipPruneError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ClipPruneError(f"params: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return params


def load(*names: str, path: str | Path = "params.yaml") -> tuple:
    """Validated sections `names` of the params file, in order."""
    params = load_params(path)
    return tuple(section(params, n) for n in names)


def pick(params: dict, keys) -> dict:
    """The part of `params` that dotted `keys` name ("eval" a whole section, "predictor.transfer_from" one key),
    nested as in the file: what a stage that declares those keys in dvc.yaml may show."""
    out: dict = {}
    for key in keys:
        src, dst, parts = params, out, key.split(".")
        for part in parts[:-1]:
            src = src.get(part, {})
            dst = dst.setdefault(part, {})
        if parts[-1] in src:
            dst[parts[-1]] = src[parts[-1]]
    return out
