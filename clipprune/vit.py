"""One forward path that prunes patch tokens inside an open_clip VisionTransformer.

    embed -> blocks[:L] -> select tokens -> (extra tokens) -> blocks[L:] -> pool -> proj

Like ToMe, we patch the model in place: the module's class is swapped for a subclass whose forward is the
path above, and the pruning spec hangs off the module. No weight is copied and open_clip's ViT is not forked;
`unpatch` restores the original class. With keep = 1.0 the path computes exactly what open_clip does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor

from .errors import ClipPruneError
from .values import coerce


@dataclass
class SelectContext:
    """What a selector may look at when it picks the tokens to keep at the input of block `layer`."""

    vit: VisionTransformer
    layer: int
    n_keep: int  # patch tokens to keep (CLS is always kept on top)
    prev_input: Optional[Tensor]  # input of block layer-1 (for attention-based scores); None at layer 0


Selector = Callable[[Tensor, SelectContext], Tensor]
# A block runner replaces `block(x)` for merging methods (ToMe); `state` lives for one forward pass.
BlockRunner = Callable[[ResidualAttentionBlock, Tensor, int, dict], Tensor]


@dataclass
class PruneSpec:
    """How a patched ViT reduces its tokens. Either a selector at `layer`, a block runner, or both."""

    layer: int
    n_keep: int
    select: Optional[Selector] = None
    run_block: Optional[BlockRunner] = None
    # Learnable visual tokens ([n, D]) appended after selection (Phase III); never ranked or pruned, and
    # dropped before pooling. Deep variant: deep_tokens[i] (i > layer) replaces them at the input of block i.
    extra_tokens: Optional[Tensor] = None
    deep_tokens: dict[int, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ViTDims:
    """The sizes of a ViT that token counts and FLOPs depend on."""

    n_patches: int
    width: int
    heads: int
    depth: int
    mlp_width: int
    patch: int
    out_dim: int

    @classmethod
    def of(cls, vit: VisionTransformer) -> "ViTDims":
        block = vit.transformer.resblocks[0]
        return cls(n_patches=num_patches(vit), width=vit.transformer.width, heads=block.attn.num_heads,
                   depth=depth(vit), mlp_width=block.mlp.c_fc.out_features, patch=vit.patch_size[0],
                   out_dim=0 if vit.proj is None else vit.proj.shape[1])


def num_patches(vit: VisionTransformer) -> int:
    return vit.grid_size[0] * vit.grid_size[1]


def depth(vit: VisionTransformer) -> int:
    return len(vit.transformer.resblocks)


def keep_count(keep: float, n_patches: int) -> int:
    """Patch tokens kept for a keep ratio: round(keep * N), at least one."""
    return max(1, int(round(keep * n_patches)))


def check_vit(vit: Any) -> VisionTransformer:
    """The visual tower if it is an open_clip ViT this path supports; one clear error otherwise."""
    vit = getattr(vit, "visual", vit)
    if not isinstance(vit, VisionTransformer):
        raise ClipPruneError(f"token pruning needs an open_clip VisionTransformer, got {type(vit).__name__}")
    if not vit.transformer.batch_first:
        raise ClipPruneError("token pruning needs a batch-first open_clip transformer (open_clip >= 2.24)")
    if vit.attn_pool is not None:
        raise ClipPruneError("token pruning does not support attentional pooling (CoCa-style) towers")
    if not all(type(b) is ResidualAttentionBlock for b in vit.transformer.resblocks):
        raise ClipPruneError("token pruning supports open_clip's default ResidualAttentionBlock only")
    return vit


def setting(keep: Any, layer: Any) -> tuple[float, int]:
    """(keep, layer) as Python numbers: numpy/torch scalars are read as numbers; a bool is neither."""
    return coerce(keep, float, "keep"), coerce(layer, int, "layer")


def check_setting(vit: VisionTransformer, *, keep: float, layer: int) -> None:
    keep, layer = setting(keep, layer)
    if not 0.0 < keep <= 1.0:
        raise ClipPruneError(f"keep must be in (0, 1], got {keep!r}")
    if not 0 <= layer < depth(vit):
        raise ClipPruneError(f"layer must be in [0, {depth(vit)}) for this model, got {layer!r}")


def keep_patches(x: Tensor, keep_idx: Tensor) -> Tensor:
    """CLS plus the patch tokens at `keep_idx` ([B, n] patch indices, CLS excluded), in raster order.

    Raster order makes the result independent of how a selector happened to order its picks.
    """
    idx = keep_idx.sort(dim=1).values + 1
    patches = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :1], patches], dim=1)


def keep_top_scores(x: Tensor, scores: Tensor, n_keep: int) -> Tensor:
    """Keep the n_keep patches with the highest scores ([B, N]); ties go to the lower patch index."""
    # A stable descending sort makes tie-breaking deterministic (topk's is not specified).
    order = scores.sort(dim=1, descending=True, stable=True).indices
    return keep_patches(x, order[:, :n_keep])


def _pruned_forward(self: VisionTransformer, x: Tensor):
    spec: PruneSpec = self._clipprune
    x = self._embeds(x)
    state: dict = {}
    prev = None
    extra, deep = spec.extra_tokens, spec.deep_tokens
    if torch.jit.is_tracing() and extra is not None:  # fvcore: traced, they become constants, which must not need grad
        extra, deep = extra.data, {i: t.data for i, t in deep.items()}
    n_extra = 0 if extra is None else extra.shape[-2]
    state["n_extra"] = n_extra  # block runners (ToMe) must not merge the extra tokens into patches
    for i, block in enumerate(self.transformer.resblocks):
        if i == spec.layer:
            if spec.select is not None:
                x = spec.select(x, SelectContext(vit=self, layer=i, n_keep=spec.n_keep, prev_input=prev))
            if n_extra:
                x = torch.cat([x, extra.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        elif n_extra and i in deep:  # extra tokens stay last: swap in this block's fresh set
            x = torch.cat([x[:, :-n_extra], deep[i].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        prev = x
        x = spec.run_block(block, x, i, state) if spec.run_block is not None else block(x)
    if n_extra:
        x = x[:, :-n_extra]  # not image tokens: pooling (avg or tok) and output tokens see CLS + patches only
    pooled, tokens = pool_project(self, x)
    return (pooled, tokens) if self.output_tokens else pooled


def pool_project(vit: VisionTransformer, x: Tensor) -> tuple[Tensor, Tensor]:
    """open_clip's tail after the blocks: pool (CLS or mean), then the projection."""
    pooled, tokens = vit._pool(x)
    if vit.proj is not None:
        pooled = pooled @ vit.proj
    return pooled, tokens


def run_blocks(vit: VisionTransformer, x: Tensor, *, start: int = 0, stop: Optional[int] = None) -> Tensor:
    """Plain open_clip blocks start..stop-1 on x (no selection): the shared prefix/suffix of golden search."""
    for block in vit.transformer.resblocks[start:stop]:
        x = block(x)
    return x


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"Pruned{cls.__name__}", (cls,), {"forward": _pruned_forward, "_clipprune_base": cls})
    return _PATCHED_CLASSES[cls]


def apply_spec(model: Any, spec: PruneSpec) -> VisionTransformer:
    """Patch `model` (a CLIP or its visual tower) in place to run the pruned forward path with `spec`."""
    vit = check_vit(model)
    if not hasattr(vit, "_clipprune"):
        vit.__class__ = _patched_class(vit.__class__)
    vit._clipprune = spec
    return vit


def unpatch(model: Any) -> VisionTransformer:
    """Restore the original open_clip forward; a no-op on an unpatched model."""
    vit = getattr(model, "visual", model)
    if hasattr(vit, "_clipprune"):
        vit.__class__ = vit._clipprune_base
        del vit._clipprune
    return vit


def is_patched(model: Any) -> bool:
    return hasattr(getattr(model, "visual", model), "_clipprune")


def split_heads(t: Tensor, heads: int) -> Tensor:
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


def qkv(block: ResidualAttentionBlock, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v ([B, H, N, d_head]) of a block's attention on its input x, recomputed from its weights.

    open_clip calls MultiheadAttention with need_weights=False, so no attention map ever comes out.
    """
    attn = block.attn
    h = block.ln_1(x)
    q, k, v = torch.nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return split_heads(q, attn.num_heads), split_heads(k, attn.num_heads), split_heads(v, attn.num_heads)


def cls_attention(block: ResidualAttentionBlock, x: Tensor) -> Tensor:
    """Head-averaged attention of the CLS query to every patch key in `block` ([B, N] patches only).

    Only the CLS query is projected: the cost is one K projection plus N dot products per head.
    """
    attn = block.attn
    h = block.ln_1(x)
    d = h.shape[-1]
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = torch.nn.functional.linear(h[:, :1], w[:d], None if b is None else b[:d])
    k = torch.nn.functional.linear(h, w[d : 2 * d], None if b is None else b[d : 2 * d])
    q, k = split_heads(q, attn.num_heads), split_heads(k, attn.num_heads)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, H, 1, N+1]
    return logits.softmax(dim=-1).mean(dim=1)[:, 0, 1:]
