"""Numeric precision of the towers as a param (compute.precision), one context for every stage that runs them.

fp32: plain float32, bit-exact, the default and what the exactness tests use. tf32: float32 storage with TF32
matmuls on CUDA (identical to fp32 on the CPU). bf16/fp16: torch.autocast, which runs matmuls and convolutions in
half precision and keeps reductions, softmax and LayerNorm in float32. auto: fp16 on CUDA, fp32 elsewhere.
The paper profile uses auto: CoOp evaluated (and tuned) CLIP in fp16 on GPUs; it casts the weights with
`.half()`, we autocast, which keeps LayerNorm and softmax in float32 (the usual mixed-precision recipe).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "auto")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(precision: str, device: str | torch.device) -> str:
    """The precision actually used on `device`: auto becomes fp16 on CUDA and fp32 elsewhere."""
    if precision not in PRECISIONS:
        from .errors import ClipPruneError

        raise ClipPruneError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "fp16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: str | torch.device):
    """A context running the towers at `precision` on `device` (no-op for fp32 and tf32 on the CPU)."""
    dev = torch.device(device)
    p = resolve(precision, dev)
    if dev.type == "cuda":
        # TF32 only when asked for (tf32) or under autocast (where float32 leftovers may use it); fp32 stays exact.
        torch.backends.cuda.matmul.allow_tf32 = p != "fp32"
        torch.backends.cudnn.allow_tf32 = p != "fp32"
    if p in _DTYPES:
        return torch.autocast(dev.type, dtype=_DTYPES[p])
    return nullcontext()


def grad_scaler(precision: str, device: str | torch.device) -> torch.amp.GradScaler:
    """A loss scaler for training: enabled for fp16 on CUDA only (bf16 has float32's range and needs none)."""
    dev = torch.device(device)
    return torch.amp.GradScaler(dev.type, enabled=resolve(precision, dev) == "fp16" and dev.type == "cuda")

