"""params.yaml as typed sections: one loader that validates, so every stage fails with one clear line.

Each stage reads only the sections it declares in dvc.yaml; the dataclasses below are the schema and the
documentation of every key (params.yaml repeats them as comments).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Union

import yaml

from .errors import ClipPruneError


# ------------------------------------------------------------------------------------------------ rules
# Each section lists what its values must be (RULES, per key) and how keys must agree (CHECKS), next to its fields.
# They run when a section is built, so every stage refuses a bad value before any work.
@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    says: Callable[[], str]  # what a value must be, e.g. ">= 1"; lazy: choices may live in heavier modules

    def __and__(self, other: "Rule") -> "Rule":
        return Rule(lambda v: self.ok(v) and other.ok(v), lambda: f"{self.says()} and {other.says()}")


def at_least(lo: float) -> Rule:
    return Rule(lambda v: v >= lo, lambda: f">= {lo}")


def between(lo: float, hi: float, *, lo_open: bool = False) -> Rule:
    return Rule(lambda v: (lo < v if lo_open else lo <= v) and v <= hi, lambda: f"in {'(' if lo_open else '['}{lo}, {hi}]")


def one_of(names: Callable[[], Any]) -> Rule:
    return Rule(lambda v: v in names(), lambda: "one of: " + ", ".join(names()))


def each(rule: Rule) -> Rule:
    """A rule for every item of a list (and the list must not be empty)."""
    return Rule(lambda v: len(v) > 0 and all(rule.ok(x) for x in v), lambda: f"a non-empty list, each {rule.says()}")


unique = Rule(lambda v: len(set(v)) == len(v), lambda: "without repeats")
nonempty = Rule(lambda v: len(v) > 0, lambda: "non-empty")
# The benchmark's rows (experiment.setups_for builds each) and the names the other modules register.
EVAL_ROWS = ("full", "random", "cls_attention", "tome", "golden", "predictor", "predictor+tokens", "full+tokens")


def _golden_scores():
    from .golden import SCORES

    return tuple(SCORES)


def _predictor_losses():
    from .predictor import LOSSES

    return tuple(LOSSES)


def _precisions():
    from .precision import PRECISIONS

    return PRECISIONS


def _dataset_ok(name: str) -> bool:
    """synth/<task> must name a task of the generated world; other sources are checked by the data stage."""
    if not name.startswith("synth"):
        return bool(name)
    from .synth import TASKS

    return name.removeprefix("synth/") in TASKS


def _dataset_names() -> str:
    from .synth import TASKS

    return ", ".join(f"synth/{t}" for t in TASKS) + " (or wds/<name>, folder, coop/<Name>, a clip_benchmark name)"


class Section:
    """Base of every params section: its RULES and CHECKS run when it is built (from YAML or in code)."""

    RULES: ClassVar[dict[str, Rule]] = {}
    CHECKS: ClassVar[list[tuple[Callable[[Any], bool], str]]] = []  # (agrees, what to fix) across keys

    def __post_init__(self) -> None:
        name = next((n for n, c in SECTIONS.items() if c is type(self)), type(self).__name__)
        for key, rule in self.RULES.items():
            value = getattr(self, key)
            if not rule.ok(value):
                raise ClipPruneError(f"params: '{name}.{key}' must be {rule.says()}, got {value!r}")
        for agrees, fix in self.CHECKS:
            if not agrees(self):
                raise ClipPruneError(f"params: {fix}")


@dataclass
class DataParams(Section):
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
    RULES = {"datasets": each(Rule(_dataset_ok, _dataset_names)) & unique, "root": nonempty, "n_train": at_least(0),
             "n_test": at_least(1), "seed": at_least(0)}  # n_test: a cap above the split size keeps it all


@dataclass
class ModelParams(Section):
    arch: str = "clipprune-tiny"  # open_clip architecture (ours is registered by clipprune.model)
    pretrained: Optional[str] = None  # None: trained by the pretrain stage; else an open_clip tag or a .pt path
    RULES = {"arch": nonempty}


@dataclass
class PretrainParams(Section):
    RULES = {"steps": at_least(0), "batch_size": at_least(1), "lr": at_least(0), "weight_decay": at_least(0),
             "warmup": at_least(0), "text_freeze_frac": between(0, 1), "seed": at_least(0), "threads": at_least(1)}
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 100
    text_freeze_frac: float = 0.5  # text tower lr held at 0 for this fraction of steps (see README)
    seed: int = 0
    threads: int = 2


@dataclass
class PruneParams(Section):
    # The gate judges a method against full: judging full itself could never fail.
    RULES = {"keep": between(0, 1, lo_open=True), "layer": at_least(0),
             "method": one_of(lambda: tuple(r for r in EVAL_ROWS if r != "full"))}
    keep: float = 0.6  # fraction of patch tokens kept (CLS always kept)
    layer: int = 1  # prune at the input of this block (0-based)
    method: str = "predictor+tokens"  # the method the accuracy gate judges


# first: the first n_train train images | stratified: n_train drawn per class with data.seed (CoOp/ImageNet train
# lists are sorted by class: ImageNet's first 100,000 images cover 78 of its 1,000 classes).
TRAIN_SAMPLES = ("first", "stratified")


@dataclass
class GoldenParams(Section):
    RULES = {"score": one_of(_golden_scores), "unit": at_least(1), "per_round": at_least(0),
             "budget": between(0, 1, lo_open=True), "n_train": at_least(1), "batch_size": at_least(1),
             "shard_size": at_least(1), "chunk_tokens": at_least(1), "train_sample": one_of(lambda: TRAIN_SAMPLES)}
    CHECKS = [(lambda g: g.shard_size % g.batch_size == 0,
               "'golden.shard_size' must be a multiple of 'golden.batch_size' (shards hold whole batches)")]
    score: str = "similarity"  # label | max | similarity | fidelity
    unit: int = 1  # k: units are k x k patch blocks
    per_round: int = 16  # m: units eliminated per round (0 = one-shot leave-one-out)
    budget: float = 1.0  # fraction of units ranked by search; the rest follow the last round's scores
    joint: bool = False  # synthetic tasks: rank each image once, the score summed over every task (fidelity, max)
    n_train: int = 4000  # train images ranked (predictor targets); the whole test split is ranked
    train_sample: str = "first"  # which n_train: first (a generated world's order is random) | stratified (by class)
    batch_size: int = 32
    shard_size: int = 512
    chunk_tokens: int = 4096  # tokens per candidate batch (cache-sized is fastest on CPU; raise on GPU)


@dataclass
class PredictorParams(Section):
    RULES = {"loss": one_of(_predictor_losses), "d": at_least(1), "epochs": at_least(1), "lr": at_least(0),
             "weight_decay": at_least(0), "batch_size": at_least(1), "seed": at_least(0)}
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
class TuneParams(Section):
    RULES = {"visual_tokens": at_least(0), "text_ctx": at_least(0), "shots": at_least(1), "epochs": at_least(1),
             "lr": at_least(0), "batch_size": at_least(1), "seed": at_least(0), "augment": one_of(lambda: AUGMENTS),
             "warmup_epochs": at_least(0), "warmup_lr": at_least(0), "schedule": one_of(lambda: SCHEDULES),
             "weight_decay": at_least(0), "fewshot": one_of(lambda: FEWSHOT)}
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


@dataclass
class EvalParams(Section):
    RULES = {"batch_size": at_least(1), "methods": each(one_of(lambda: EVAL_ROWS)) & unique,
             "sweep_keeps": each(between(0, 1, lo_open=True)) & unique, "sweep_methods": each(one_of(lambda: EVAL_ROWS)) & unique,
             "sweep_images": at_least(1), "overlay_images": at_least(1), "bootstrap": at_least(100)}
    batch_size: int = 250
    methods: list[str] = field(default_factory=lambda: ["full", "random", "cls_attention", "tome", "golden", "predictor",
                                                        "predictor+tokens", "full+tokens"])
    sweep_keeps: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    sweep_methods: list[str] = field(default_factory=lambda: ["random", "cls_attention", "tome", "golden", "predictor"])
    sweep_images: int = 500  # test images per dataset per sweep point: a class-stratified sample drawn with data.seed
    overlay_images: int = 6  # test images drawn with each method's kept patches
    bootstrap: int = 1000  # paired bootstrap resamples (over test images, seeded by data.seed) behind every interval


@dataclass
class ComputeParams(Section):
    """How the stages run, not what they compute: precision changes results (declared in dvc.yaml); workers do not
    (images arrive in the same order for any count, tested), so changing them reruns nothing."""

    RULES = {"precision": one_of(_precisions), "workers": at_least(0)}
    precision: str = "fp32"  # fp32 | tf32 | bf16 | fp16 | auto (clipprune/precision.py says what each does)
    workers: int = 0  # DataLoader worker processes decoding images (0: in the main process)


DROP_ESTIMATES = ("point", "upper")


@dataclass
class CheckParams(Section):
    RULES = {"max_drop": at_least(0), "tolerance": at_least(0), "drop_estimate": one_of(lambda: DROP_ESTIMATES)}
    max_drop: float = 0.05  # fail when mean acc1 of prune.method is more than this below full
    # point: the observed mean drop | upper: the upper end of its paired-bootstrap 95% interval (fails when the
    # data cannot rule out a drop beyond max_drop)
    drop_estimate: str = "point"
    tolerance: float = 0.01  # fail when any acc1 fell more than this below the committed reports/metrics.json


SECTIONS: dict[str, type] = {"data": DataParams, "model": ModelParams, "pretrain": PretrainParams, "prune": PruneParams,
                             "golden": GoldenParams, "predictor": PredictorParams, "tune": TuneParams,
                             "eval": EvalParams, "compute": ComputeParams, "check": CheckParams}


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
    """The validated dataclass for `params[name]`: a missing section, an unknown key, a wrong type or a value out of
    range is one clear error. No section a stage reads may be absent: its defaults would pass silently (a gate
    without `check` would judge by thresholds nobody chose)."""
    cls = SECTIONS[name]
    if params.get(name) is None:
        raise ClipPruneError(f"params: section '{name}' is {'empty' if name in params else 'missing'}; add it with its "
                             f"keys ({', '.join(f.name for f in dataclasses.fields(cls))}; clipprune/config.py documents them)")
    raw = params[name]
    if not isinstance(raw, dict):
        raise ClipPruneError(f"params: section '{name}' must be a mapping of keys, got {raw!r}")
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


# Rules across sections: (sections, agrees, what to fix). They run whenever the file has those sections, whichever
# stage loads it, so the gate never judges a method the evaluation does not run.
ACROSS: list[tuple[tuple[str, ...], Callable[..., bool], str]] = [
    (("prune", "eval"), lambda prune, ev: prune.method in ev.methods,
     "'prune.method' must be one of the evaluated rows 'eval.methods' (the gate judges it against full)"),
    (("prune", "eval"), lambda prune, ev: "full" in ev.methods, "'eval.methods' must include full (the gate's reference)"),
]


def _type_name(tp: Any) -> str:
    """'float', 'list of str', 'str or null': how a YAML user reads a type."""
    origin = typing.get_origin(tp)
    if origin is Union:
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if origin is list:
        return "list of " + _type_name(typing.get_args(tp)[0])
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ClipPruneError(f"no params file at {path}: run from the repository root")
    try:
        params = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ClipPruneError(f"{where}: not valid YAML: {e.problem or e.context}; fix that line") from None
    except yaml.YAMLError as e:
        raise ClipPruneError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ClipPruneError(f"{path} must be a mapping of sections ({', '.join(SECTIONS)}), got {type(params).__name__}")
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ClipPruneError(f"params: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return params


def check_across(params: dict) -> None:
    """The ACROSS rules whose sections the file has."""
    for names, agrees, fix in ACROSS:
        if all(params.get(n) is not None for n in names) and not agrees(*(section(params, n) for n in names)):
            raise ClipPruneError(f"params: {fix}")


def load(*names: str, path: str | Path = "params.yaml") -> tuple:
    """Validated sections `names` of the params file, in order (the rules across sections checked too)."""
    params = load_params(path)
    out = tuple(section(params, n) for n in names)
    check_across(params)
    return out


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
