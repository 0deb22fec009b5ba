"""Many rows, one pass: every evaluated row of one dataset from one model load and one decode of each image.

A stage used to evaluate row by row: reload the CLIP, decode the test set, rebuild the text classifier, then run
clip_benchmark's `evaluate`. Here each batch is decoded once and every row runs on it in turn: the model is
patched with the row's spec (the same spec object all along, so a seeded random stream advances batch by batch
exactly as before) and unpatched after. Logits are clip_benchmark's (`100 * normalize(image features) @ classifier`)
and its metric formulas are applied to them, so every figure equals `zeroshot.evaluate`'s (tests/test_evaluator.py
checks that row by row). Only each image's top-5 classes are kept, never the logits: memory does not grow with
the number of classes. `correct` (top-1, per image, in image order) is what paired statistics need.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import vit as V
from .errors import ClipPruneError
from .precision import autocast


@dataclass
class Evaluation:
    metrics: dict  # acc1, acc5 (None below 5 classes), mean_per_class_recall: clip_benchmark's keys and formulas
    correct: Tensor  # [n] bool: top-1 correct, per image in evaluation order


@dataclass
class _Row:
    spec: V.PruneSpec
    classifier: Tensor
    ranking: Optional[Tensor]  # elimination orders of the evaluated images, in evaluation order (golden rows)
    method: object
    top: list
    argmax: list


def _prepare(setup, *, model, tokenizer, classnames, templates, plain, device, n_patches, order) -> _Row:
    """The row's spec (built once) and classifier; the model is left unpatched."""
    from .golden import load_ranking
    from .methods import prune

    ranking = None
    if setup.ranking is not None:
        ranking = load_ranking(setup.ranking, n_patches=n_patches).patch_order[order].to(device)
    try:
        if setup.tokens is not None:
            from .prompts import TunedTokens

            if not setup.tokens.is_file():
                raise ClipPruneError(f"no learned tokens at {setup.tokens}: run the tune stage first (dvc repro tune)")
            tuned = TunedTokens.load(setup.tokens, map_location=device)
            vit = tuned.apply(model, method=setup.method, keep=setup.keep, layer=setup.layer)
            classifier = tuned.classifier(model, tokenizer, classnames, templates=templates)
        else:
            vit = prune(model, setup.method, keep=setup.keep, layer=setup.layer)
            classifier = plain()
        spec = vit._clipprune
    finally:
        V.unpatch(model)
    # clip_benchmark saves a given classifier as float32 on the CPU and loads it onto the device: the same values.
    return _Row(spec, classifier.detach().float().to(device), ranking, setup.method, [], [])


@torch.no_grad()
def evaluate_rows(setups: Mapping, *, model, tokenizer, test, classnames: Sequence[str], templates: Sequence[str],
                  batch_size: int, indices: Optional[Sequence[int]] = None, precision: str = "fp32", workers: int = 0,
                  device: str | torch.device = "cpu") -> dict[str, Evaluation]:
    """Evaluate every `setups` row (label -> experiment.Setup) on the map-style `test` set (or its images at
    `indices`, in that order): one DataLoader pass, `workers` decoding processes, the towers at `precision`."""
    from .zeroshot import _eval_mode, classifier_weights

    dev = torch.device(device)
    n_total = len(test)
    order = torch.arange(n_total) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)
    bad = order[(order < 0) | (order >= n_total)]
    if len(bad):
        raise ClipPruneError(f"image index {int(bad[0])} is outside the {n_total} ranked test images")
    shared: list[Tensor] = []

    def plain() -> Tensor:  # the templates' classifier, built once for every row without learned tokens
        if not shared:
            shared.append(classifier_weights(model, tokenizer, classnames, templates, device=dev))
        return shared[0]

    n_patches = V.num_patches(V.check_vit(model))
    with _eval_mode(model):
        rows = {label: _prepare(s, model=model, tokenizer=tokenizer, classnames=classnames, templates=templates,
                                plain=plain, device=dev, n_patches=n_patches, order=order)
                for label, s in setups.items()}
        subset = test if indices is None else torch.utils.data.Subset(test, order.tolist())
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                             pin_memory=dev.type == "cuda")
        k = 5 if len(classnames) >= 5 else 1  # clip_benchmark: top-5 only with at least 5 classes
        targets, start = [], 0
        try:
            for images, target in loader:
                images = images.to(dev, non_blocking=True)
                for row in rows.values():
                    V.apply_spec(model, row.spec)
                    if row.ranking is not None:
                        row.method.bind(row.ranking[start : start + len(images)])
                    with autocast(precision, dev):
                        features = F.normalize(model.encode_image(images), dim=-1)
                        logits = (100.0 * features @ row.classifier).float()
                    row.top.append(logits.topk(k, 1, True, True)[1].cpu())
                    row.argmax.append(logits.argmax(dim=1).cpu())
                targets.append(torch.as_tensor(target).cpu())
                start += len(images)
        finally:
            V.unpatch(model)
    target = torch.cat(targets)
    return {label: _metrics(torch.cat(row.top), torch.cat(row.argmax), target) for label, row in rows.items()}


def _metrics(top: Tensor, argmax: Tensor, target: Tensor) -> Evaluation:
    """clip_benchmark's `accuracy` and `balanced_accuracy_score`, from each image's top-k classes."""
    from sklearn.metrics import balanced_accuracy_score

    n = len(target)
    correct = top.t().eq(target.view(1, -1).expand(top.shape[1], -1))  # [k, n], as clip_benchmark's accuracy
    acc = [correct[:j].reshape(-1).float().sum().item() / n for j in sorted({1, top.shape[1]})]
    acc5 = acc[1] if len(acc) > 1 else float("nan")
    metrics = {"acc1": acc[0], "acc5": acc5, "mean_per_class_recall": balanced_accuracy_score(target, argmax)}
    return Evaluation({k: (None if math.isnan(v) else float(v)) for k, v in metrics.items()},
                      correct[0].clone())

