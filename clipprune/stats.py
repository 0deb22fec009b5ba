"""Paired bootstrap intervals for differences in top-1 accuracy, from per-image correctness.

Two rows evaluated on the same test images differ image by image; resampling the images (the same resample for
both rows) gives the distribution of their accuracy difference, paired, so what the images have in common
cancels. Per dataset, and for the mean over datasets (each dataset resampled on its own, as a benchmark of
separate datasets is; the synthetic tasks, which share their images, are treated the same way, which makes
the mean's interval somewhat narrower than a joint resample would). Percentile intervals, seeded.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def bits(s: str) -> np.ndarray:
    """'0110' (the evaluate stage's per_image_top1) -> bool array."""
    return np.frombuffer(s.encode(), dtype=np.uint8) == ord("1")


def to_bits(correct) -> str:
    return "".join("1" if c else "0" for c in np.asarray(correct, dtype=bool))


def paired_bootstrap(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *, resamples: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """acc(a) - acc(b) per dataset and for the mean over datasets, each with its `level` percentile interval.

    a, b: {dataset: bool[n]} over the same images in the same order. Returns {dataset | "mean": {"diff", "lo", "hi",
    "excludes_zero"}}; diff is the observed difference, the interval the bootstrap's.
    """
    if set(a) != set(b):
        raise ValueError(f"rows evaluated on different datasets: {sorted(set(a) ^ set(b))}")
    rng = np.random.default_rng(seed)
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    out, draws = {}, []
    for d in a:  # in the given order, so the draws do not depend on dict hashing
        x, y = np.asarray(a[d], dtype=np.int8), np.asarray(b[d], dtype=np.int8)
        if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
            raise ValueError(f"{d}: per-image results of different lengths ({x.shape} vs {y.shape})")
        delta = (x - y).astype(np.float64)
        idx = rng.integers(0, len(delta), size=(resamples, len(delta)))
        boot = delta[idx].mean(axis=1)
        draws.append(boot)
        out[d] = _summary(delta.mean(), boot, q)
    mean_obs = float(np.mean([out[d]["diff"] for d in a]))
    out["mean"] = _summary(mean_obs, np.mean(draws, axis=0), q)
    return out


def _summary(observed: float, boot: np.ndarray, q: tuple[float, float]) -> dict:
    lo, hi = np.percentile(boot, q)
    lo, hi = float(lo), float(hi)
    return {"diff": round(float(observed), 6), "lo": round(lo, 6), "hi": round(hi, 6),
            "excludes_zero": bool(lo > 0 or hi < 0)}
