"""Throughput of the full and the pruned image tower, measured side by side (ToMe's protocol).

Random input, eval mode, inference_mode, warm-up discarded; the full and pruned models alternate batch by
batch so that machine noise hits both alike, and we report medians and their ratio. Absolute images/s on a
shared machine mean little: the ratio against the FLOPs-bound speedup is the figure to read.
On CUDA every timed forward is bracketed by torch.cuda.synchronize(): kernels run asynchronously, and without
it the clock would stop when the last kernel is queued, not when it has run.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from tqdm import tqdm

from . import vit as V
from .errors import ClipPruneError
from .flops import flop_report
from .methods import Method
from .precision import autocast, resolve

DEVICES = ("cpu", "cuda")


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device the towers can run on here: cpu, cuda or cuda:N; one clear line otherwise."""
    text = str(device)
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICES:
        raise ClipPruneError(f"--device {text!r} is not a device: give cpu, cuda or cuda:N")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ClipPruneError(f"--device {text}: no CUDA GPU is visible here (torch {torch.__version__}, "
                                 f"CUDA {torch.version.cuda or 'none'}); use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ClipPruneError(f"--device {text}: this machine shows {n} GPU(s), cuda:0..cuda:{n - 1}")
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    try:  # Linux names the CPU model here; platform.processor() is often empty
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def timed(forward: Callable[[], Any], *, device: torch.device) -> float:
    """Seconds one call of `forward` takes; on CUDA the queue is drained before and after, else it times launches."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    forward()
    sync()
    return time.perf_counter() - t0


def throughput(model: Any, method: Method, *, keep: float, layer: int, batch: int, repeats: int = 10,
               warmup: int = 2, seed: int = 0, device: str | torch.device = "cpu", precision: str = "fp32") -> dict:
    """images/s of full and pruned, measured speedup, FLOPs-bound speedup and their ratio.

    The tower is moved to `device` (in place) and runs under `precision`'s autocast (clipprune.precision)."""
    dev = check_device(device)
    used = resolve(precision, dev)  # auto -> fp16 on CUDA, fp32 elsewhere; refuses unknown names first
    vit = V.check_vit(model).eval().to(dev)
    report = flop_report(vit, method, keep=keep, layer=layer)  # MACs: the same at any precision, so counted outside it
    x = torch.randn(batch, 3, *vit.image_size, generator=torch.Generator().manual_seed(seed)).to(vit.conv1.weight)
    spec = method.spec(vit, keep=keep, layer=layer)
    times = {"full": [], "pruned": []}
    with torch.inference_mode(), autocast(used, dev):
        for i in tqdm(range(warmup + repeats), desc=f"bench {method.name}", leave=False):
            for name in ("full", "pruned"):
                V.unpatch(vit) if name == "full" else V.apply_spec(vit, spec)
                t = timed(lambda: vit(x), device=dev)
                if i >= warmup:
                    times[name].append(t)
    V.unpatch(vit)
    full, pruned = statistics.median(times["full"]), statistics.median(times["pruned"])
    measured = full / pruned
    return {
        "device": str(dev), "device_name": device_name(dev), "precision": used,
        "batch": batch, "repeats": repeats, "threads": torch.get_num_threads(),
        "full_img_per_s": round(batch / full, 3), "pruned_img_per_s": round(batch / pruned, 3),
        "measured_speedup": round(measured, 4), "flops_speedup": round(report.ratio, 4),
        "measured_over_flops": round(measured / report.ratio, 4), **report.as_dict(),
    }
