"""Throughput of the full and the pruned image tower, measured side by side (ToMe's protocol).

Random input, eval mode, inference_mode, warm-up discarded; the full and pruned models alternate batch by
batch so that machine noise hits both alike, and we report medians and their ratio. Absolute images/s on a
shared machine mean little: the ratio against the FLOPs-bound speedup is the figure to read.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from tqdm import tqdm

from . import vit as V
from .flops import flop_report
from .methods import Method


def _time(vit, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    vit(x)
    return time.perf_counter() - t0


def throughput(model: Any, method: Method, *, keep: float, layer: int, batch: int, repeats: int = 10,
               warmup: int = 2, seed: int = 0) -> dict:
    """images/s of full and pruned, measured speedup, FLOPs-bound speedup and their ratio."""
    vit = V.check_vit(model).eval()
    report = flop_report(vit, method, keep=keep, layer=layer)
    x = torch.randn(batch, 3, *vit.image_size, generator=torch.Generator().manual_seed(seed)).to(vit.conv1.weight)
    spec = method.spec(vit, keep=keep, layer=layer)
    times = {"full": [], "pruned": []}
    with torch.inference_mode():
        for i in tqdm(range(warmup + repeats), desc=f"bench {method.name}", leave=False):
            for name in ("full", "pruned"):
                V.unpatch(vit) if name == "full" else V.apply_spec(vit, spec)
                t = _time(vit, x)
                if i >= warmup:
                    times[name].append(t)
    V.unpatch(vit)
    full, pruned = statistics.median(times["full"]), statistics.median(times["pruned"])
    measured = full / pruned
    return {
        "batch": batch, "repeats": repeats, "threads": torch.get_num_threads(),
        "full_img_per_s": round(batch / full, 3), "pruned_img_per_s": round(batch / pruned, 3),
        "measured_speedup": round(measured, 4), "flops_speedup": round(report.ratio, 4),
        "measured_over_flops": round(measured / report.ratio, 4), **report.as_dict(),
    }
