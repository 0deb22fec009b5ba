"""The benchmark's rows: each evaluated method as a concrete setting at matched GFLOPs, and its evaluation.

Matching: the predictor at (prune.keep, prune.layer), its own cost included, sets the GFLOPs target; random
and CLS-attention get the keep count, ToMe the (fractional) r, that meets it within 1%. The golden oracle
keeps exactly the predictor's token count (its search cost is offline, like the predictor's training).
`+tokens` rows add the learned visual tokens' cost, stated beside them; `full` rows are unpruned.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import vit as V
from .config import EVAL_ROWS, DataParams, EvalParams, GoldenParams, ModelParams, PruneParams
from .errors import ClipPruneError
from .flops import analytic_gflops, match_setting
from .methods import Method, build_method
from .pipeline import MODELS, group_of, ranking_path, safe_name

LABELS = EVAL_ROWS  # the rows params may name (config checks eval.methods against them)


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

    def describe(self) -> dict:
        cfg = {k: v for k, v in dataclasses.asdict(self.method).items() if not k.startswith("_")}
        return {"method": self.method.name, "keep": self.keep, "layer": self.layer, **cfg}


def setups_for(dataset: str, *, data: DataParams, golden: GoldenParams, prune: PruneParams, dims: V.ViTDims,
               labels: tuple[str, ...] = LABELS, keep: Optional[float] = None) -> dict[str, Setup]:
    """The rows for `dataset`, matched to the predictor's GFLOPs at `keep` (default prune.keep)."""
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
        else:
            raise ClipPruneError(f"unknown eval method {label!r}; choose from: {', '.join(LABELS)}")
    return out


def setup_gflops(setup: Setup, dims: V.ViTDims) -> float:
    """Analytic GFLOPs of a row (the flops stage cross-checks these with fvcore)."""
    if setup.tokens is not None and setup.tokens.is_file():
        from .prompts import TunedTokens

        return TunedTokens.load(setup.tokens).analytic_gflops(dims, setup.method, keep=setup.keep, layer=setup.layer)
    return analytic_gflops(dims, setup.method, keep=setup.keep, layer=setup.layer)


def evaluate_setup(setup: Setup, *, dataset: str, data: DataParams, model_params: ModelParams, eval_params: EvalParams,
                   limit: Optional[int] = None, device: str = "cpu") -> dict:
    """acc1/acc5/mean-per-class recall of one row on the test split, through clip_benchmark's evaluate."""
    import torch

    from .data import load_dataset
    from .golden import load_ranking
    from .methods import bound_batches, prune
    from .pipeline import dataset_root, load_clip
    from .zeroshot import classifier_weights, evaluate

    model, preprocess, tokenizer = load_clip(model_params, device=device)
    ds = load_dataset(dataset, root=dataset_root(data, dataset), split="test", transform=preprocess)
    # The first data.n_test test images (all of a generated world's); the golden stage ranks exactly these.
    limit = data.n_test if limit is None else min(limit, data.n_test)
    dataset_obj = ds.indexable()
    if limit < len(dataset_obj):
        dataset_obj = torch.utils.data.Subset(dataset_obj, range(limit))
    loader = torch.utils.data.DataLoader(dataset_obj, batch_size=eval_params.batch_size, shuffle=False)
    if setup.tokens is not None:
        from .prompts import TunedTokens

        if not setup.tokens.is_file():
            raise ClipPruneError(f"no learned tokens at {setup.tokens}: run the tune stage first (dvc repro tune)")
        tuned = TunedTokens.load(setup.tokens)
        tuned.apply(model, method=setup.method, keep=setup.keep, layer=setup.layer)
        classifier = tuned.classifier(model, tokenizer, ds.classnames, templates=ds.templates)
    else:
        prune(model, setup.method, keep=setup.keep, layer=setup.layer)
        classifier = classifier_weights(model, tokenizer, ds.classnames, ds.templates, device=device)
    if setup.ranking is not None:
        loader = bound_batches(loader, setup.method, load_ranking(setup.ranking, n_patches=V.num_patches(model.visual)).patch_order[:len(dataset_obj)])
    return evaluate(model, loader, tokenizer=tokenizer, classnames=ds.classnames, templates=ds.templates,
                    classifier=classifier, device=device)
