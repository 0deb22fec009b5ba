"""FLOPs of the image tower, counted by fvcore and by the analytic formula, and the matched-FLOPs solver.

Convention: one multiply-add = one FLOP (MACs), as fvcore counts and as the paper's GFLOPs are read.
fvcore has no handle for fused attention and silently counts 0 for it, so we add handles for
`aten::scaled_dot_product_attention` and `aten::_native_multi_head_attention` (MultiheadAttention's
inference fast path). fvcore also counts LayerNorm (5 per element) and the output projection;
the analytic formula counts patch embedding + per block 4nd^2 + 2n^2d (attention) + 2md*d_mlp (MLP)
+ the projection + the method's own extra matmuls (scoring, matching). They agree within ~0.2%.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import vit as V
from .errors import ClipPruneError
from .methods import Method, prune

CONVENTION = "GFLOPs counted as multiply-adds (MACs), batch 1, image tower only"


def _sdpa_flop(inputs, outputs) -> float:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    *batch, lq, e_q = q
    lk, e_v = k[-2], v[-1]
    b = 1
    for s in batch:
        b *= s
    return b * lq * lk * (e_q + e_v)


def _native_mha_flop(inputs, outputs) -> float:
    from fvcore.nn.jit_handles import get_shape

    b, n, d = get_shape(inputs[0])
    s = get_shape(inputs[1])[1]
    return b * n * d * 3 * d + 2 * b * n * s * d + b * n * d * d  # in-proj, attention, out-proj


HANDLES: dict[str, Callable] = {
    "aten::scaled_dot_product_attention": _sdpa_flop,
    "aten::_native_multi_head_attention": _native_mha_flop,
}
# Elementwise ops that fvcore does not count and neither do we (MACs convention).
_IGNORED = ["aten::add", "aten::add_", "aten::gelu", "aten::mul", "aten::div", "aten::softmax", "aten::sub",
            "aten::log", "aten::norm", "aten::mean", "aten::sigmoid", "aten::linalg_vector_norm",
            "aten::scatter_reduce", "aten::max", "aten::sort", "aten::argsort", "aten::rand", "aten::clamp_min",
            "aten::sum", "aten::ones", "aten::new_ones", "aten::topk", "aten::exp", "aten::neg"]


def fvcore_gflops(vit: Any, *, image_size: Optional[int] = None) -> float:
    """GFLOPs (MACs) of one image through `vit` (patched or not), counted by fvcore."""
    vit = getattr(vit, "visual", vit)
    h, w = (image_size, image_size) if image_size else vit.image_size  # non-square towers count as they are
    x = torch.zeros(1, 3, h, w, dtype=vit.conv1.weight.dtype, device=vit.conv1.weight.device)
    was_training = vit.training
    vit.eval()
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore traces with the deprecated torch.jit
        from fvcore.nn import FlopCountAnalysis

        fca = FlopCountAnalysis(vit, x).set_op_handle(**HANDLES, **{k: None for k in _IGNORED})
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = fca.total()
    vit.train(was_training)
    return total / 1e9


def block_macs(n_attn: int, n_mlp: int, dims: V.ViTDims) -> float:
    d = dims.width
    return 4 * n_attn * d * d + 2 * n_attn * n_attn * d + 2 * n_mlp * d * dims.mlp_width


def analytic_gflops(dims: V.ViTDims, method: Method, *, keep: float, layer: int, extra_tokens: int = 0) -> float:
    """GFLOPs (MACs) from the formula: what `method` at (keep, layer) must cost on a ViT of `dims`."""
    embed = dims.n_patches * 3 * dims.patch * dims.patch * dims.width
    counts = method.token_counts(dims, keep=keep, layer=layer)
    blocks = sum(block_macs(a + (extra_tokens if i >= layer else 0), m + (extra_tokens if i >= layer else 0), dims)
                 for i, (a, m) in enumerate(counts))
    return (embed + blocks + dims.width * dims.out_dim + method.extra_macs(dims, keep=keep, layer=layer)) / 1e9


@dataclass
class FlopReport:
    full_gflops: float
    pruned_gflops: float
    full_analytic: float
    pruned_analytic: float

    @property
    def ratio(self) -> float:
        return self.full_gflops / self.pruned_gflops

    def as_dict(self) -> dict:
        return {"convention": CONVENTION, "full_gflops": round(self.full_gflops, 4),
                "pruned_gflops": round(self.pruned_gflops, 4), "speedup_bound": round(self.ratio, 4),
                "full_gflops_analytic": round(self.full_analytic, 4),
                "pruned_gflops_analytic": round(self.pruned_analytic, 4)}


def flop_report(model: Any, method: Method, *, keep: float, layer: int) -> FlopReport:
    """Full and pruned GFLOPs by fvcore and by the formula. Leaves `model` unpatched."""
    from .methods import Full

    vit = V.check_vit(model)
    method.check(vit, keep=keep, layer=layer)  # fail before the slow counting
    dims = V.ViTDims.of(vit)
    V.unpatch(vit)
    full = fvcore_gflops(vit)
    prune(vit, method, keep=keep, layer=layer)
    try:
        pruned = fvcore_gflops(vit)
    finally:
        V.unpatch(vit)
    return FlopReport(full, pruned, analytic_gflops(dims, Full(), keep=1.0, layer=layer),
                      analytic_gflops(dims, method, keep=keep, layer=layer))


def match_setting(dims: V.ViTDims, method: Method, *, target_gflops: float, layer: int, tol: float = 0.01) -> dict:
    """The setting of `method` whose analytic GFLOPs come closest to `target_gflops` (keep, or ToMe's r).

    Pruning methods search the integer count of kept patches (each count is one distinct setting);
    ToMe bisects its fractional r. Raises if the closest setting misses the target by more than `tol`.
    """
    import dataclasses

    from .methods import ToMe

    if isinstance(method, ToMe):
        def cost(r: float) -> float:
            return analytic_gflops(dims, dataclasses.replace(method, r=r), keep=1.0, layer=layer)

        lo, hi = 0.0, float(dims.n_patches)
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(mid) > target_gflops else (lo, mid)
        # The schedule is piecewise constant in r: take whichever end lands closer.
        r = min((lo, hi), key=lambda v: abs(cost(v) - target_gflops))
        setting, got = {"r": round(r, 6)}, cost(r)
    else:
        best = min(range(1, dims.n_patches + 1),
                   key=lambda n: abs(analytic_gflops(dims, method, keep=n / dims.n_patches, layer=layer) - target_gflops))
        keep = best / dims.n_patches
        setting, got = {"keep": keep, "n_keep": best, "layer": layer}, analytic_gflops(dims, method, keep=keep, layer=layer)
    err = abs(got - target_gflops) / target_gflops
    if err > tol:
        raise ClipPruneError(f"{method.name} cannot reach {target_gflops:.3f} GFLOPs within {tol:.0%} (closest {got:.3f})")
    return {**setting, "gflops": got, "rel_error": err}
