"""Zero-shot classification: classifier weights from prompt templates, evaluation through clip_benchmark.

Anything with `encode_image(images)` and `encode_text(tokens)` plugs in, so a pruned model is evaluated by
exactly the code that evaluates an unpruned one.
"""

import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace
from typing import Any

import torch
from clip_benchmark.metrics import zeroshot_classification as cb_zeroshot

TASK = "zeroshot_classification"


def classifier_weights(model, tokenizer, classnames: Sequence[str], templates: Sequence[str], *,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """[D, C] classifier: per class, the normalised mean of the normalised embeddings of its prompts.

    This is clip_benchmark's own builder (the one `evaluate` uses), not open_clip's build_zero_shot_classifier:
    that one formats templates positionally (so "a photo of a {c}." raises KeyError) and calls
    encode_text(normalize=True), which a wrapped model need not accept. The maths is the same.
    """
    dev = torch.device(device)
    with _on_device(dev), _eval_mode(model):
        return cb_zeroshot.zero_shot_classifier(model, tokenizer, list(classnames), list(templates), dev.type,
                                                amp=False)


def evaluate(model, dataloader: Iterable, *, tokenizer, classnames: Sequence[str], templates: Sequence[str],
             device: str | torch.device = "cpu", amp: bool = False,
             classifier: torch.Tensor | None = None) -> dict[str, float | None]:
    """Top-1/top-5 accuracy and mean per-class recall, computed by clip_benchmark's `evaluate`.

    dataloader yields (images, int labels) batches. `classifier` ([D, C]) replaces the one built from the
    templates (e.g. learned text context). acc5 is None when there are fewer than 5 classes (clip_benchmark
    returns NaN there, which is not JSON).
    """
    dev = torch.device(device)
    # clip_benchmark reads len(dataloader.dataset.classes) to decide whether top-5 exists; wds batched
    # pipelines and plain tensors datasets may lack .classes, so hand it the classnames we were given.
    loader = _Loader(dataloader, classnames)
    with tempfile.TemporaryDirectory() as tmp, _on_device(dev), _eval_mode(model), warnings.catch_warnings():
        # clip_benchmark's accuracy() calls float() on a 1-element array: deprecated in numpy 2.x, an error
        # from numpy 2.4 on (hence numpy<2.4 in pyproject). Silence only that warning.
        warnings.filterwarnings("ignore", message="Conversion of an array with ndim > 0", category=DeprecationWarning)
        load_clfs = []
        if classifier is not None:
            if classifier.ndim != 2 or classifier.shape[1] != len(classnames):
                raise ValueError(f"classifier must be [D, {len(classnames)}], got {tuple(classifier.shape)}")
            # clip_benchmark only takes a precomputed classifier as a file (its load_clfs option).
            load_clfs = [os.path.join(tmp, "classifier.pt")]
            torch.save(classifier.detach().float().cpu(), load_clfs[0])
        metrics = cb_zeroshot.evaluate(model, loader, tokenizer, list(classnames), list(templates), dev.type,
                                       amp=amp, load_clfs=load_clfs)
    return {k: (None if math.isnan(v) else float(v)) for k, v in metrics.items()}


class _Loader:
    """What clip_benchmark's evaluate reads from a DataLoader: iteration, and `.dataset.classes`."""

    def __init__(self, batches: Iterable, classnames: Sequence[str]):
        self.batches = batches
        self.dataset = SimpleNamespace(classes=list(classnames))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:  # for tqdm's total; TypeError (no len) makes tqdm show a plain counter
        return len(self.batches)


@contextmanager
def _eval_mode(model):
    """Evaluate in eval mode (dropout, PatchDropout off); afterwards every submodule is back in its own mode
    (a training wrapper may hold a frozen tower in eval mode, which model.train() would flip)."""
    modes = {m: m.training for m in model.modules()} if isinstance(model, torch.nn.Module) else {}
    for m in modes:
        m.training = False
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _on_device(dev: torch.device):
    # clip_benchmark moves tensors with .to(<device type>): with an index, make it the current CUDA device.
    return torch.cuda.device(dev) if dev.type == "cuda" and dev.index is not None else nullcontext()


def result_record(*, dataset: str, model: str, pretrained: str | None, metrics: dict[str, float | None],
                  method: str, keep: float, layer: int, gflops: float,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """clip_benchmark's result JSON, plus the pruning configuration as top-level keys.

    `clip_benchmark build *.json` flattens these to CSV; it concatenates model + " " + pretrained, so
    pretrained is a string ("" for random init).
    """
    record = {"dataset": dataset, "model": model, "pretrained": pretrained or "", "task": TASK,
              "metrics": dict(metrics), "method": method, "keep": float(keep), "layer": int(layer),
              "gflops": float(gflops)}
    clash = sorted(set(extra or {}) & set(record))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite the record's own keys")
    return record | dict(extra or {})
