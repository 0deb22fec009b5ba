"""The benchmark's rows: each evaluated method as a concrete setting at matched GFLOPs, and its evaluation.

Matching: the predictor at (prune.keep, prune.layer), its own cost included, sets the GFLOPs target; random
and CLS-attention get the keep count, ToMe the (fractional) r, that meets it within 1%. The golden oracle
keeps exactly the predictor's token count (its search cost is offline, like the predictor's training).
`+tokens` rows add the learned visual tokens' cost, stated beside them; `full` rows are unpruned.
With predictor.transfer_from set, every dataset is also evaluated with another dataset's predictor and tokens
(`predictor@<source>`, `predictor+tokens@<source>`: the paper's "Ours (ImageNet-trained)" row). The sweep reads a
class-stratified sample of each test split (`sweep_indices`), the same images for every method and keep.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import vit as V
from .config import (EVAL_ROWS, ComputeParams, DataParams, EvalParams, GoldenParams, ModelParams, PredictorParams,
                     PruneParams)
from .data import dataset_labels, stratified_indices
from .errors import ClipPruneError
from .flops import analytic_gflops, match_setting
from .methods import Method, build_method
from .pipeline import MODELS, group_of, ranking_path, safe_name

LABELS = EVAL_ROWS  # the rows params may name (config checks eval.methods against them)
TRANSFERRED = ("predictor", "predictor+tokens")  # the rows predictor.transfer_from adds, as <row>@<source>


def transfer_labels(data: DataParams, predictor: Optional[PredictorParams]) -> tuple[str, ...]:
    """The rows predictor.transfer_from adds (none when it is null); one clear error for a source not evaluated."""
    source = None if predictor is None else predictor.transfer_from
    if source is None:
        return ()
    if source not in data.datasets:
        raise ClipPruneError(f"params: 'predictor.transfer_from' is {source!r}, which is not in data.datasets; add it "
                             f"there (its predictor and tokens are trained on it) or set transfer_from: null")
    return tuple(f"{row}@{source.split('/')[-1]}" for row in TRANSFERRED)


def eval_labels(eval_params: EvalParams, data: DataParams, predictor: Optional[PredictorParams]) -> tuple[str, ...]:
    """Every row the evaluate stage writes: eval.methods, then the transferred rows."""
    return tuple(eval_params.methods) + transfer_labels(data, predictor)


def predictor_path(key: str) -> Path:
    return MODELS / "predictors" / f"{key}.pt"


def tokens_path(dataset: str, *, pruned: bool) -> Path:
    return MODELS / "tokens" / f"{safe_name(dataset)}-{'pruned' if pruned else 'full'}.pt"


@dataclass
class Setup:
    """One evaluated row: a method with its concrete setting."""

    label: str
    method: Method
    keep: float
    layer: int
    tokens: Optional[Path] = None  # learned visual/text tokens to apply
    ranking: Optional[Path] = None  # golden oracle: elimination orders of the evaluated images
    trained_on: Optional[str] = None  # transferred rows: the dataset the predictor and tokens were trained on

    def describe(self) -> dict:
        cfg = {k: v for k, v in dataclasses.asdict(self.method).items() if not k.startswith("_")}
        out = {"method": self.method.name, "keep": self.keep, "layer": self.layer, **cfg}
        if self.trained_on is not None:
            out["trained_on"] = self.trained_on
        return out


def setups_for(dataset: str, *, data: DataParams, golden: GoldenParams, prune: PruneParams, dims: V.ViTDims,
               labels: tuple[str, ...] = LABELS, keep: Optional[float] = None,
               transfer_from: Optional[str] = None) -> dict[str, Setup]:
    """The rows for `dataset`, matched to the predictor's GFLOPs at `keep` (default prune.keep).

    A label `predictor@<source>` / `predictor+tokens@<source>` (see transfer_labels) uses the predictor, and the
    pruned-model tokens, trained on the dataset `transfer_from`, on `dataset`'s own test split and class names.
    """
    keep = prune.keep if keep is None else keep
    layer = prune.layer
    key = group_of(data, golden, dataset)
    predictor = build_method("predictor", path=str(predictor_path(key)))
    # Capped at the full model: at keep 1.0 the predictor's own cost would ask the baselines for more than full.
    target = min(analytic_gflops(dims, predictor, keep=keep, layer=layer),
                 analytic_gflops(dims, build_method("full"), keep=1.0, layer=layer))
    out = {}
    for label in labels:
        if label == "full":
            out[label] = Setup(label, build_method("full"), 1.0, layer)
        elif label == "full+tokens":
            out[label] = Setup(label, build_method("full"), 1.0, layer, tokens=tokens_path(dataset, pruned=False))
        elif label in ("random", "cls_attention"):
            s = match_setting(dims, build_method(label), target_gflops=target, layer=layer)
            out[label] = Setup(label, build_method(label), s["keep"], layer)
        elif label == "tome":
            s = match_setting(dims, build_method("tome", r=0.0), target_gflops=target, layer=layer)
            out[label] = Setup(label, build_method("tome", r=s["r"]), 1.0, layer)
        elif label == "golden":
            out[label] = Setup(label, build_method("ranking"), keep, layer, ranking=ranking_path(key, "test"))
        elif label == "predictor":
            out[label] = Setup(label, predictor, keep, layer)
        elif label == "predictor+tokens":
            out[label] = Setup(label, predictor, keep, layer, tokens=tokens_path(dataset, pruned=True))
        elif transfer_from is not None and label in {f"{r}@{transfer_from.split('/')[-1]}" for r in TRANSFERRED}:
            # Same architecture and keep as this dataset's predictor: the same GFLOPs, so matched like the others.
            source = build_method("predictor", path=str(predictor_path(group_of(data, golden, transfer_from))))
            tokens = tokens_path(transfer_from, pruned=True) if label.startswith("predictor+tokens@") else None
            out[label] = Setup(label, source, keep, layer, tokens=tokens, trained_on=transfer_from)
        else:
            raise ClipPruneError(f"unknown eval method {label!r}; choose from: {', '.join(LABELS)}")
    return out


def setup_gflops(setup: Setup, dims: V.ViTDims) -> float:
    """Analytic GFLOPs of a row (the flops stage cross-checks these with fvcore)."""
    if setup.tokens is not None and setup.tokens.is_file():
        from .prompts import TunedTokens

        return TunedTokens.load(setup.tokens).analytic_gflops(dims, setup.method, keep=setup.keep, layer=setup.layer)
    return analytic_gflops(dims, setup.method, keep=setup.keep, layer=setup.layer)


def digest(indices: Sequence[int]) -> str:
    """A short name for a list of image indices (sweep rows record which images they were measured on)."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def ranked_test_set(dataset: str, *, data: DataParams, transform=None):
    """(loaded dataset, map-style test set) restricted to the first data.n_test images: those the golden stage
    ranks, so a ranking's row i is this set's image i."""
    import torch

    from .data import load_dataset
    from .pipeline import dataset_root

    ds = load_dataset(dataset, root=dataset_root(data, dataset), split="test", transform=transform)
    test = ds.indexable()
    if data.n_test < len(test):
        test = torch.utils.data.Subset(test, range(data.n_test))
    return ds, test


def sweep_indices(dataset: str, *, data: DataParams, n: int) -> list[int]:
    """The sweep's images of `dataset`: n of the ranked test images, class-stratified, drawn with data.seed."""
    _, test = ranked_test_set(dataset, data=data)
    return stratified_indices(dataset_labels(test), n, seed=data.seed)


def evaluate_dataset(setups: dict[str, Setup], *, dataset: str, data: DataParams, model_params: ModelParams,
                     eval_params: EvalParams, compute: Optional[ComputeParams] = None,
                     indices: Optional[Sequence[int]] = None, device: str = "cpu", clip: Optional[tuple] = None) -> dict:
    """acc1/acc5/mean-per-class recall (and per-image top-1 correctness) of every row on the test split (the first
    data.n_test images, or those of them at `indices`): the model loaded, the images decoded and the templates'
    classifier built once for all rows (clipprune.evaluator). `clip`: (model, preprocess, tokenizer) already loaded
    on `device`, reused across datasets (evaluation leaves the model as it found it)."""
    from .evaluator import evaluate_rows
    from .pipeline import load_clip

    compute = compute or ComputeParams()
    model, preprocess, tokenizer = clip or load_clip(model_params, device=device)
    ds, test = ranked_test_set(dataset, data=data, transform=preprocess)
    return evaluate_rows(setups, model=model, tokenizer=tokenizer, test=test, classnames=ds.classnames,
                         templates=ds.templates, batch_size=eval_params.batch_size, indices=indices,
                         precision=compute.precision, workers=compute.workers, device=device)
