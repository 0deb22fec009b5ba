"""Token-reduction methods behind one registry; each method's config is plain data.

    method = build_method("cls_attention", fuse=True)
    prune(model, method, keep=0.6, layer=3)

A method knows how to patch a ViT (`spec`) and which token counts its setting implies in every block
(`token_counts`), which the analytic FLOP model and the tests use as the ground truth.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from . import vit as V
from .errors import ClipPruneError
from .values import coerce

METHODS: dict[str, type["Method"]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def build_method(name: str, **cfg: Any) -> "Method":
    """A method from its registry name and options; one clear error for an unknown name, an unknown or missing
    option, or a value of the wrong type (numpy/torch scalars count as the numbers they hold)."""
    if name not in METHODS:
        raise ClipPruneError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    options = cls.options()
    unknown = sorted(set(cfg) - set(options))
    if unknown:
        raise ClipPruneError(f"method {name!r} has no option {', '.join(unknown)}; it takes: {', '.join(options) or 'none'}")
    missing = [k for k, f in options.items() if k not in cfg and f.default is dataclasses.MISSING]
    if missing:
        raise ClipPruneError(f"method {name!r} needs option " + ", ".join(f"{k} ({options[k].metadata.get('help', k)})" for k in missing))
    return cls(**cfg)


def cli_methods() -> list[str]:
    """Methods the command line can run (a `ranking` needs per-image rows bound at run time)."""
    return [name for name, cls in METHODS.items() if cls.runs_alone]


@dataclass
class Method:
    """Base: prune once at the input of `layer`, keeping round(keep * N) patches (CLS always kept)."""

    name: ClassVar[str] = "base"
    runs_alone: ClassVar[bool] = True  # False: needs data bound at run time, so the CLI cannot run it

    def __post_init__(self) -> None:
        # Every option is typed once, here, for build_method, direct construction and dataclasses.replace alike.
        hints = _hints(type(self))
        for key in self.options():
            setattr(self, key, coerce(getattr(self, key), hints[key], f"method {self.name!r} option {key}"))
        self.validate()

    def validate(self) -> None:
        """Range checks of the options that need no model (those that do belong in `check`)."""

    @classmethod
    def options(cls) -> dict[str, dataclasses.Field]:
        """The user-settable options (private fields hold run-time state)."""
        return {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}

    def selector(self, vit, *, keep: float, layer: int) -> V.Selector:
        raise NotImplementedError

    def check(self, vit, *, keep: float, layer: int) -> None:
        V.check_setting(vit, keep=keep, layer=layer)

    def spec(self, vit, *, keep: float, layer: int) -> V.PruneSpec:
        self.check(vit, keep=keep, layer=layer)
        n_keep = V.keep_count(keep, V.num_patches(vit))
        return V.PruneSpec(layer=layer, n_keep=n_keep, select=self.selector(vit, keep=keep, layer=layer),
                           info={"method": self.name, "keep": keep, "layer": layer, **dataclasses.asdict(self)})

    def extra_tokens_after_select(self, *, n_keep: int, n_patches: int) -> int:
        return 0

    def token_counts(self, dims: V.ViTDims, *, keep: float, layer: int) -> list[tuple[int, int]]:
        """(tokens entering attention, tokens entering the MLP) for every block."""
        n_keep = V.keep_count(keep, dims.n_patches)
        n_after = 1 + n_keep + self.extra_tokens_after_select(n_keep=n_keep, n_patches=dims.n_patches)
        return [(n, n) for n in (dims.n_patches + 1 if i < layer else n_after for i in range(dims.depth))]

    def extra_macs(self, dims: V.ViTDims, *, keep: float, layer: int) -> float:
        """MACs spent outside the blocks' own matmuls (scoring, matching)."""
        return 0.0


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def prune(model: Any, method: Method, *, keep: float, layer: int):
    """Patch `model` (CLIP or its visual tower) in place with `method`; returns the visual tower."""
    vit = V.check_vit(model)
    keep, layer = V.setting(keep, layer)
    return V.apply_spec(vit, method.spec(vit, keep=keep, layer=layer))


@torch.no_grad()
def encode_pruned(model: Any, method: Method, images: Tensor, *, keep: float, layer: int,
                  ranking: Optional[Tensor] = None) -> Tensor:
    """model.encode_image(images) pruned by `method` at (keep, layer), binding `ranking` rows (elimination
    orders, for `ranking`) when given; the model is unpatched afterwards, whatever happens."""
    prune(model, method, keep=keep, layer=layer)
    try:
        if ranking is not None:
            method.bind(ranking)
        return model.encode_image(images)
    finally:
        V.unpatch(model)


@register("full")
@dataclass
class Full(Method):
    """No pruning: the reference every method is compared against (runs the same patched path)."""

    def spec(self, vit, *, keep: float, layer: int) -> V.PruneSpec:
        V.check_setting(vit, keep=1.0, layer=layer)
        return V.PruneSpec(layer=layer, n_keep=V.num_patches(vit), info={"method": self.name})

    def token_counts(self, dims: V.ViTDims, *, keep: float, layer: int) -> list[tuple[int, int]]:
        return [(dims.n_patches + 1, dims.n_patches + 1)] * dims.depth


@register("random")
@dataclass
class RandomPruning(Method):
    """Keep a uniformly random subset of patches per image (seeded; the stream advances per batch)."""

    seed: int = 0

    def selector(self, vit, *, keep: float, layer: int) -> V.Selector:
        gen = torch.Generator().manual_seed(self.seed)

        def select(x: Tensor, ctx: V.SelectContext) -> Tensor:
            scores = torch.rand(x.shape[0], x.shape[1] - 1, generator=gen).to(x.device)
            return V.keep_top_scores(x, scores, ctx.n_keep)

        return select


@register("cls_attention")
@dataclass
class ClsAttention(Method):
    """EViT: keep the patches the CLS token attends to most in the block before `layer`.

    With `fuse`, the pruned patches are merged into one token weighted by their CLS attention (EViT's
    inattentive-token fusion), so the sequence after pruning is CLS + kept + 1.
    """

    fuse: bool = False

    def check(self, vit, *, keep: float, layer: int) -> None:
        super().check(vit, keep=keep, layer=layer)
        if layer < 1:
            raise ClipPruneError("cls_attention reads the attention of the block before the pruning layer: layer must be >= 1")

    def selector(self, vit, *, keep: float, layer: int) -> V.Selector:
        fuse = self.fuse

        def select(x: Tensor, ctx: V.SelectContext) -> Tensor:
            attn = V.cls_attention(ctx.vit.transformer.resblocks[ctx.layer - 1], ctx.prev_input)
            order = attn.sort(dim=1, descending=True, stable=True).indices
            kept = V.keep_patches(x, order[:, : ctx.n_keep])
            if not fuse or ctx.n_keep == attn.shape[1]:
                return kept  # nothing pruned, nothing to fuse
            drop = order[:, ctx.n_keep :]
            w = attn.gather(1, drop).unsqueeze(-1)
            tokens = x[:, 1:].gather(1, drop.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            fused = (w * tokens).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-12)
            return torch.cat([kept, fused], dim=1)

        return select

    def extra_tokens_after_select(self, *, n_keep: int, n_patches: int) -> int:
        return int(self.fuse and n_keep < n_patches)

    def extra_macs(self, dims: V.ViTDims, *, keep: float, layer: int) -> float:
        n, d = dims.n_patches + 1, dims.width
        # CLS query and all keys projected once more, then one dot product per key.
        return (n + 1) * d * d + n * d


@register("ranking")
@dataclass
class RankingPruning(Method):
    """Prune by a given per-image ranking: the golden oracle and any precomputed order use this.

    A ranking row is the elimination order of one image's patches, least important first. Rows are
    bound to the next batch with `bind(rows)` (see `bound_batches`), so any evaluation loop can use it.
    """

    runs_alone: ClassVar[bool] = False
    _rows: Optional[Tensor] = dataclasses.field(default=None, repr=False)

    def bind(self, rows: Tensor) -> None:
        self._rows = rows

    def selector(self, vit, *, keep: float, layer: int) -> V.Selector:
        def select(x: Tensor, ctx: V.SelectContext) -> Tensor:
            rows = self._rows
            if rows is None or rows.shape != (x.shape[0], x.shape[1] - 1):
                got = None if rows is None else tuple(rows.shape)
                raise ClipPruneError(f"ranking pruning needs rankings bound for this batch of shape {(x.shape[0], x.shape[1] - 1)}, got {got}")
            self._rows = None  # one binding serves one forward pass
            scores = ranking_scores(rows.to(x.device))
            return V.keep_top_scores(x, scores, ctx.n_keep)

        return select


def ranking_scores(order: Tensor) -> Tensor:
    """Scores ([B, N], higher = more important) from elimination orders ([B, N], least important first)."""
    pos = torch.arange(order.shape[1], device=order.device, dtype=torch.float32).expand_as(order)
    return torch.empty_like(pos).scatter_(1, order.long(), pos)


def bound_batches(loader, method: RankingPruning, ranking: Tensor):
    """Yield the loader's batches, binding each one's ranking rows (in dataset order) just before it is used."""
    start = 0
    for batch in loader:
        n = len(batch[0])
        method.bind(ranking[start : start + n])
        start += n
        yield batch
    if start != len(ranking):
        raise ClipPruneError(f"ranking has {len(ranking)} rows but the data had {start} images")


def tome_schedule(r: float, *, depth: int, start: int = 0) -> list[int]:
    """Tokens merged in each block: a fractional r spreads round(r * blocks) merges evenly over the blocks.

    A fractional r is what lets ToMe meet a FLOP target within 1%: integer r moves FLOPs in ~3% steps.
    """
    blocks = depth - start
    return [0] * start + [math.floor((i + 1) * r + 1e-9) - math.floor(i * r + 1e-9) for i in range(blocks)]


@register("tome")
@dataclass
class ToMe(Method):
    """Token Merging (Bolya et al. 2023): bipartite soft matching after attention in every block from `start`,
    size-weighted averages of merged tokens, proportional attention (log size added to attention logits).
    `r` is the number of tokens merged per block; a fractional r is spread evenly (see tome_schedule).
    `keep`/`layer` do not apply to ToMe."""

    # No default: a ToMe that merges nothing is the full model, and should be asked for as such.
    r: float = dataclasses.field(metadata={"help": "tokens merged per block, e.g. r=9.6"})
    start: int = 0

    def validate(self) -> None:
        if self.r < 0:
            raise ClipPruneError(f"method 'tome' option r must be >= 0 (tokens merged per block), got {self.r!r}")
        if self.start < 0:
            raise ClipPruneError(f"method 'tome' option start must be >= 0 (the first merging block), got {self.start!r}")

    def check(self, vit, *, keep: float, layer: int) -> None:
        if not (0 <= self.start < V.depth(vit)):
            raise ClipPruneError(f"tome start must be in [0, {V.depth(vit)}), got {self.start!r}")

    def _merges(self, n_patches: int, depth: int) -> list[int]:
        """Merges actually applied per block: ToMe can merge at most half the non-CLS tokens at a time."""
        t, out = n_patches + 1, []
        for r in tome_schedule(self.r, depth=depth, start=self.start):
            r = min(r, (t - 1) // 2)
            out.append(r)
            t -= r
        return out

    def spec(self, vit, *, keep: float, layer: int) -> V.PruneSpec:
        self.check(vit, keep=keep, layer=layer)
        merges = self._merges(V.num_patches(vit), V.depth(vit))

        def run_block(block, x: Tensor, i: int, state: dict) -> Tensor:
            size = state.get("size")
            if merges[i] == 0 and size is None:
                return block(x)  # nothing merged yet: open_clip's own block, bit for bit
            if size is None:
                size = x.new_ones(x.shape[0], x.shape[1], 1)
            x, size = tome_block(block, x, size, merges[i], protect_last=state.get("n_extra", 0))
            state["size"] = size
            return x

        return V.PruneSpec(layer=0, n_keep=V.num_patches(vit), run_block=run_block,
                           info={"method": self.name, "r": self.r, "start": self.start, "merges": merges})

    def token_counts(self, dims: V.ViTDims, *, keep: float, layer: int) -> list[tuple[int, int]]:
        t, out = dims.n_patches + 1, []
        for r in self._merges(dims.n_patches, dims.depth):
            out.append((t, t - r))
            t -= r
        return out

    def extra_macs(self, dims: V.ViTDims, *, keep: float, layer: int) -> float:
        # Matching: a @ b^T between the two halves of the head-averaged keys, in every merging block.
        d_head = dims.width // dims.heads
        return sum(math.ceil(t / 2) * (t // 2) * d_head
                   for (t, m) in self.token_counts(dims, keep=keep, layer=layer) if m < t)


def tome_block(block, x: Tensor, size: Tensor, r: int, *, protect_last: int = 0) -> tuple[Tensor, Tensor]:
    """One open_clip block with proportional attention, then r merges between attention and MLP.

    The last `protect_last` tokens (learnable visual tokens) attend and are attended but never merge:
    ToMe itself protects only CLS, and would average prompts into patches.
    """
    q, k, v = V.qkv(block, x)
    bias = size.log()[:, None, None, :, 0].to(q.dtype)  # [B, 1, 1, N]: a token of size s counts s times
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    o = o.transpose(1, 2).reshape(x.shape)
    x = x + block.ls_1(block.attn.out_proj(o))
    if r > 0:
        n = x.shape[1] - protect_last
        merged, msize = merge_wavg(x[:, :n], size[:, :n], metric=k.mean(dim=1)[:, :n], r=r)
        x, size = torch.cat([merged, x[:, n:]], dim=1), torch.cat([msize, size[:, n:]], dim=1)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, size


def merge_wavg(x: Tensor, size: Tensor, *, metric: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """ToMe's bipartite soft matching (CLS protected) and size-weighted merge of r tokens."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        scores[:, 0, :] = -math.inf  # CLS (index 0, in set a) never merges
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx = edge_idx[:, r:].sort(dim=1).values  # sorted: CLS stays first
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)

    def merge(t: Tensor) -> Tensor:
        src, dst = t[:, ::2], t[:, 1::2]
        c = t.shape[-1]
        unm = src.gather(1, unm_idx.expand(-1, -1, c))
        src = src.gather(1, src_idx.expand(-1, -1, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    x = merge(x * size)
    size = merge(size)
    return x / size, size


@register("predictor")
@dataclass
class PredictorPruning(Method):
    """Keep the patches a trained ranking predictor (clipprune.predictor, Phase II) scores highest.

    The predictor reads the tokens at the input of `layer` (what is about to be pruned), so no label and no
    search is needed; its MACs count in every FLOP figure (`extra_macs`). `path` names a file written by
    `predictor.save_predictor`; `from_module` wraps any in-memory module mapping tokens [B, 1+N, D] to
    scores [B, N] (higher = keep).
    """

    path: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._module: Optional[torch.nn.Module] = None  # not a field: kept out of configs and spec info

    @classmethod
    def from_module(cls, module: torch.nn.Module) -> "PredictorPruning":
        method = cls()
        method._module = module
        return method

    def module(self) -> torch.nn.Module:
        """The predictor, loaded from `path` once."""
        if self._module is None:
            if not self.path:
                raise ClipPruneError("method 'predictor' needs path: a file from the predictor stage (dvc repro predictor)")
            from .predictor import load_predictor

            self._module = load_predictor(self.path)
        return self._module

    def check(self, vit, *, keep: float, layer: int) -> None:
        super().check(vit, keep=keep, layer=layer)
        module = self.module()
        arch = getattr(module, "arch", None)
        if arch is not None and (arch["seq_len"], arch["width"]) != (V.num_patches(vit) + 1, vit.transformer.width):
            raise ClipPruneError(f"predictor was built for {arch['seq_len']} tokens of width {arch['width']}, this ViT has "
                                 f"{V.num_patches(vit) + 1} of width {vit.transformer.width}")
        trained = getattr(module, "config", {}).get("layer", layer)
        if trained != layer:
            raise ClipPruneError(f"predictor was trained on the tokens of layer {trained}, not {layer}")

    def selector(self, vit, *, keep: float, layer: int) -> V.Selector:
        from .predictor import constant_weights

        module = self.module().eval().to(vit.conv1.weight.device)  # on the model's device: no per-batch round trip

        def select(x: Tensor, ctx: V.SelectContext) -> Tensor:
            p = next(module.parameters(), None)
            inp = x if p is None else x.to(p.device, p.dtype)
            with torch.no_grad(), constant_weights(module):  # discrete selection: nothing trains through scores
                scores = module(inp)
            return V.keep_top_scores(x, scores.to(x.device), ctx.n_keep)

        return select

    def extra_macs(self, dims: V.ViTDims, *, keep: float, layer: int) -> float:
        macs = getattr(self.module(), "macs", None)  # a module without .macs() (a test stub) counts as free
        return float(macs()) if callable(macs) else 0.0
