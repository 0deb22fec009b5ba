"""Golden Ranking (Phase I): greedy backward elimination of patch units, scored by the pruned model itself.

Each round scores every remaining unit u by the model's output on the sequence without u (and without
everything eliminated before), then eliminates the m units whose removal hurts least (highest score).
Rounds repeat until the budget is ranked; m >= the number of units is one-shot leave-one-out. The result
is a full elimination order of every patch, least important first.

Scores (fixing the official code, spec §5.7): `label` = softmax probability of the ground-truth class,
`max` = the pruned copy's own max class probability, `similarity` = cosine of its image embedding to the
unpruned image's; added here, `fidelity` = -KL of its zero-shot prediction from the unpruned image's.
Tasks that share their images (the synthetic world's) can be ranked jointly: given a list of classifiers,
`fidelity` and `max` add up over the tasks, and one ranking serves them all.
Speed: blocks < L run once per image; all candidates of a round (of all images in a batch) go through
blocks >= L together, chunked to a token bound. Batches have fixed boundaries by dataset
index, so an image's result never depends on the number of processes; shards are checkpoints.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from . import vit as V
from .dist import barrier, rank_world
from .errors import ClipPruneError
from .io import save_torch_atomic
from .precision import autocast
from .precision import resolve as resolve_precision

FORMAT = "clipprune-golden-v1"


# --------------------------------------------------------------------------------------------- scores
def _task_logits(emb: Tensor, ctx: dict) -> list[Tensor]:
    """Scaled zero-shot logits per task: `classifier` is one task's [D, C] or a list of them (tasks that share
    their images, ranked jointly: their scores add up, so one ranking serves them all)."""
    cls = ctx["classifier"]
    return [ctx["scale"] * emb @ w for w in (cls if isinstance(cls, (list, tuple)) else [cls])]


def score_label(emb: Tensor, ctx: dict) -> Tensor:
    """P(y_gt | pruned copy): the paper's label-driven score (the official code used the scaled logit)."""
    (logits,) = _task_logits(emb, ctx)  # one task: GoldenSearch refuses a list for this score
    return logits.softmax(dim=-1).gather(1, ctx["labels"][:, None])[:, 0]


def score_max(emb: Tensor, ctx: dict) -> Tensor:
    """max_c P(c | pruned copy): each copy's own confidence (the official code used copy 0's class)."""
    return sum(logits.softmax(dim=-1).max(dim=-1).values for logits in _task_logits(emb, ctx))


def score_similarity(emb: Tensor, ctx: dict) -> Tensor:
    """cos(pruned copy, unpruned image): needs neither labels nor text (the official code's default)."""
    return (emb * ctx["full"]).sum(dim=-1)


def score_fidelity(emb: Tensor, ctx: dict) -> Tensor:
    """-KL(P(. | unpruned image) || P(. | pruned copy)) over the task's classes: the official `similarity` idea
    (stay close to the unpruned model, no label) measured where the task reads it, in zero-shot predictions.
    Over several tasks: the sum, i.e. the KL of their joint prediction (tasks predicted independently)."""
    total = 0
    for full, pruned in zip(_task_logits(ctx["full"], ctx), _task_logits(emb, ctx)):
        log_full, log_pruned = full.log_softmax(dim=-1), pruned.log_softmax(dim=-1)
        total = total - (log_full.exp() * (log_full - log_pruned)).sum(dim=-1)
    return total


SCORES: dict[str, Callable[[Tensor, dict], Tensor]] = {"label": score_label, "max": score_max,
                                                       "similarity": score_similarity, "fidelity": score_fidelity}
NEEDS_FULL = ("similarity", "fidelity")  # scores that compare with the unpruned image's embedding
NEEDS_CLASSIFIER = ("label", "max", "fidelity")  # scores read through a task's zero-shot classifier


@dataclass(frozen=True)
class SearchConfig:
    """How the search runs. `per_round` = m (0: one-shot); `budget` = fraction of units ranked by search."""

    layer: int
    unit: int = 1
    per_round: int = 0
    budget: float = 1.0
    score: str = "similarity"
    chunk_tokens: int = 4096  # tokens per candidate batch through blocks >= L: small enough to stay in cache

    def check(self, vit) -> None:
        V.check_setting(vit, keep=1.0, layer=self.layer)
        gh, gw = vit.grid_size
        if not (isinstance(self.unit, int) and 1 <= self.unit <= min(gh, gw)):
            raise ClipPruneError(f"golden unit must be an int in [1, {min(gh, gw)}] for a {gh}x{gw} grid, got {self.unit!r}")
        if not (isinstance(self.per_round, int) and self.per_round >= 0):
            raise ClipPruneError(f"golden per_round must be an int >= 0 (0 = one-shot), got {self.per_round!r}")
        if not (0.0 < self.budget <= 1.0):
            raise ClipPruneError(f"golden budget must be in (0, 1], got {self.budget!r}")
        if self.score not in SCORES:
            raise ClipPruneError(f"unknown golden score {self.score!r}; choose one of: {', '.join(SCORES)}")


def unit_masks(grid: tuple[int, int], k: int) -> Tensor:
    """[U, N] bool: unit u covers a k x k block of the grid (smaller at the edges of a grid k does not divide)."""
    gh, gw = grid
    rows = torch.arange(gh * gw) // gw
    cols = torch.arange(gh * gw) % gw
    unit_of = (rows // k) * ((gw + k - 1) // k) + cols // k
    n_units = ((gh + k - 1) // k) * ((gw + k - 1) // k)
    return unit_of[None, :] == torch.arange(n_units)[:, None]


def forward_equivalents(dims: V.ViTDims, cfg: SearchConfig) -> float:
    """The search's MACs per image over one full forward's (the formula, blocks only): its FLOP minimum.

    Blocks < L once; blocks >= L once on the unpruned sequence (the similarity reference) and once per
    candidate of every round. Units are taken as k*k patches (edge units of a grid k does not divide are smaller).
    """
    from .flops import block_macs

    n, depth, layer = dims.n_patches + 1, dims.depth, cfg.layer
    n_units = -(-dims.n_patches // (cfg.unit * cfg.unit))
    per = cfg.unit * cfg.unit
    n_rank, m = max(1, round(cfg.budget * n_units)), cfg.per_round or n_units
    total = depth * block_macs(n, n, dims) if cfg.score in NEEDS_FULL else layer * block_macs(n, n, dims)
    left, done = n_units, 0
    while left > 0:
        t = n - (n_units - left) * per - per  # tokens of a candidate: CLS + alive patches - one unit
        total += left * (depth - layer) * block_macs(max(1, t), max(1, t), dims)
        take = min(m, n_rank - done)
        take = left if take >= left or done + take >= n_rank else take
        left, done = left - take, done + take
    return total / (depth * block_macs(n, n, dims))


@dataclass
class SearchResult:
    unit_order: Tensor  # [B, U] units, eliminated first -> last
    unit_scores: Tensor  # [B, U] score of each unit in order, from the round that eliminated it
    patch_order: Tensor  # [B, N] patches, least important first (units expanded in raster order)


class GoldenSearch:
    """The fast search on one open_clip CLIP (unpatched); see the module docstring."""

    def __init__(self, model, cfg: SearchConfig, *, classifier: Optional[Tensor | list[Tensor]] = None):
        self.vit = V.check_vit(model)
        if V.is_patched(self.vit):
            raise ClipPruneError("golden search needs the unpruned model: unpatch it first")
        cfg.check(self.vit)
        if cfg.score in NEEDS_CLASSIFIER and classifier is None:
            raise ClipPruneError(f"golden score {cfg.score!r} needs the zero-shot classifier (class text embeddings)")
        if cfg.score == "label" and isinstance(classifier, (list, tuple)):
            raise ClipPruneError("golden score 'label' reads one task's label: it cannot rank several tasks jointly "
                                 "(golden.joint: false, or a label-free score)")
        self.cfg = cfg
        self.classifier = classifier
        self.scale = model.logit_scale.exp() if hasattr(model, "logit_scale") else torch.tensor(100.0)
        self.units = unit_masks(self.vit.grid_size, cfg.unit)

    def embed(self, x: Tensor) -> Tensor:
        """Normalised image embeddings of token sequences at the input of block L."""
        x = V.run_blocks(self.vit, x, start=self.cfg.layer)
        return F.normalize(V.pool_project(self.vit, x)[0], dim=-1)

    @torch.no_grad()
    def search(self, images: Tensor, labels: Optional[Tensor] = None) -> SearchResult:
        cfg, units = self.cfg, self.units.to(images.device)
        b, (n_units, n) = images.shape[0], units.shape
        h = V.run_blocks(self.vit, self.vit._embeds(images), stop=cfg.layer)  # blocks < L: once per image
        full = self.embed(h) if cfg.score in NEEDS_FULL else None  # computed only for scores that read it
        ctx = {"full": full, "labels": labels, "scale": self.scale, "classifier": self.classifier}
        if cfg.score == "label" and labels is None:
            raise ClipPruneError("golden score 'label' needs the labels")
        n_rank = max(1, round(cfg.budget * n_units))
        m = cfg.per_round or n_units
        alive = torch.ones(b, n_units, dtype=torch.bool, device=images.device)
        order, order_scores = [], []
        while True:
            remaining = alive.nonzero()[:, 1].view(b, -1)  # every image has the same number left
            scores = self._score_round(h, alive, remaining, ctx)
            ranked = scores.sort(dim=1, descending=True, stable=True).indices  # ties: lower unit first
            done = sum(o.shape[1] for o in order)
            take = min(m, n_rank - done)
            if take >= remaining.shape[1] or done + take >= n_rank:
                # Budget reached: survivors follow in this round's order (their last scores).
                take = remaining.shape[1]
            chosen = remaining.gather(1, ranked[:, :take])
            order.append(chosen)
            order_scores.append(scores.gather(1, ranked[:, :take]))
            alive.scatter_(1, chosen, False)
            if not alive.any():
                break
        unit_order = torch.cat(order, dim=1)
        # Expand units to patches: units in elimination order, each unit's patches in raster order.
        arange = torch.arange(n_units, device=images.device).expand(b, -1)
        unit_pos = torch.empty_like(unit_order).scatter_(1, unit_order, arange)  # [B, U] position of each unit
        unit_of_patch = units.int().argmax(dim=0)  # [N]
        patch_order = (unit_pos[:, unit_of_patch] * n + torch.arange(n, device=images.device)).argsort(dim=1)
        return SearchResult(unit_order=unit_order, unit_scores=torch.cat(order_scores, dim=1), patch_order=patch_order)

    def _score_round(self, h: Tensor, alive: Tensor, remaining: Tensor, ctx: dict) -> Tensor:
        """Scores [B, R] of removing each remaining unit, every candidate of every image batched together."""
        b, r = remaining.shape
        alive_patches = (alive.float() @ self.units.to(h.device).float()).bool()  # [B, N]
        cand = alive_patches[:, None, :] & ~self.units.to(h.device)[remaining]  # [B, R, N] patches kept
        cand = cand.view(b * r, -1)
        owner = torch.arange(b, device=h.device).repeat_interleave(r)
        counts = cand.sum(dim=1)
        out = torch.empty(b * r, dtype=h.dtype, device=h.device)
        for count in counts.unique().tolist():  # units smaller at the grid's edge give other lengths
            rows = (counts == count).nonzero()[:, 0]
            idx = (~cand[rows]).to(torch.uint8).argsort(dim=1, stable=True)[:, :count] + 1  # kept, raster order
            per_chunk = max(1, self.cfg.chunk_tokens // (count + 1))
            for s in range(0, len(rows), per_chunk):
                rr, ii = rows[s : s + per_chunk], idx[s : s + per_chunk]
                o = owner[rr]
                cls = torch.zeros(len(ii), 1, dtype=ii.dtype, device=ii.device)
                tokens = h[o[:, None], torch.cat([cls, ii], dim=1)]  # CLS + kept (CLS alone once all are gone)
                sub = {**ctx, **{k: ctx[k][o] for k in ("full", "labels") if ctx[k] is not None}}
                out[rr] = SCORES[self.cfg.score](self.embed(tokens), sub).to(out.dtype)
        return out.view(b, r)


# ------------------------------------------------------------------------------------ dataset runner
def meta_key(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def tensors_digest(tensors) -> str:
    """sha256 of tensors' dtypes, shapes and bytes: what the search computes from, whatever the caller's meta says."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run_search(*, model, dataset, cfg: SearchConfig, out_path: str | Path, meta: dict,
               classifier: Optional[Tensor | list[Tensor]] = None, batch_size: int = 32, shard_size: int = 512,
               device: str = "cpu", progress: bool = True, precision: str = "fp32", workers: int = 0) -> Path:
    """Golden-rank every image of a map-style dataset ((image, label) items) into one file at out_path.

    `precision` (clipprune.precision) runs the search under autocast; `workers` DataLoader processes decode the
    images, in the same order for any count (batches are cut from each shard's images in order).

    Shards of `shard_size` images (fixed boundaries) are written atomically to `<out>.shards/` and skipped on
    rerun, so a killed run continues where it stopped. Under torchrun, ranks take shards round-robin and
    rank 0 merges; batches never straddle shards, so the file is identical for any number of processes.
    """
    out_path = Path(out_path)
    if shard_size % batch_size:
        raise ClipPruneError(f"shard_size ({shard_size}) must be a multiple of batch_size ({batch_size})")
    n_images = len(dataset)
    if n_images == 0:
        raise ClipPruneError("golden search got an empty dataset")
    search = GoldenSearch(model, cfg, classifier=classifier)
    searched = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "chunk_tokens"}  # a memory knob only
    precision = resolve_precision(precision, device)
    if precision != "fp32":  # fp32 rankings keep the bytes they had before precision was a setting
        meta = {**meta, "precision": precision}
    meta = {"format": FORMAT, **meta, "search": searched, "n_images": n_images,
            "grid": list(search.vit.grid_size), "shard_size": shard_size, "batch_size": batch_size}
    # Shards are named by everything their content depends on: a rerun under another setting, other weights or
    # another classifier never reuses them. The weights' digest stays out of the written meta (the caller's
    # meta names the model), so the output file's bytes do not depend on it.
    classifiers = [] if classifier is None else list(classifier) if isinstance(classifier, (list, tuple)) else [classifier]
    inputs = tensors_digest([*search.vit.state_dict().values(), torch.as_tensor(search.scale), *classifiers])
    key = meta_key({**meta, "inputs": inputs})
    shard_dir = out_path.with_name(out_path.name + ".shards")
    rank, world = rank_world()
    if rank == 0:
        shard_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    n_shards = (n_images + shard_size - 1) // shard_size
    mine = [s for s in range(n_shards) if s % world == rank]
    bar = tqdm(total=sum(min(shard_size, n_images - s * shard_size) for s in mine), desc=f"golden[{rank}]",
               unit="img", disable=not progress, dynamic_ncols=True)
    for s in mine:
        path = shard_dir / f"shard-{s:05d}-{key}.pt"
        lo, hi = s * shard_size, min(n_images, (s + 1) * shard_size)
        if path.exists():
            bar.update(hi - lo)
            continue
        parts = []
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch_size,
                                             shuffle=False, num_workers=workers,
                                             pin_memory=torch.device(device).type == "cuda")
        for images, labels in loader:
            images = images.to(device=device, dtype=search.vit.conv1.weight.dtype, non_blocking=True)
            labels = torch.as_tensor(labels).long().to(device)
            with autocast(precision, device):
                res = search.search(images, labels)
            parts.append((res, labels))
            bar.update(len(images))
        save_torch_atomic(path, {"meta_key": key, "lo": lo, "hi": hi,
                      "unit_order": torch.cat([p[0].unit_order for p in parts]).to(torch.int16).cpu(),
                      "unit_scores": torch.cat([p[0].unit_scores for p in parts]).to(torch.float32).cpu(),
                      "patch_order": torch.cat([p[0].patch_order for p in parts]).to(torch.int16).cpu(),
                      "labels": torch.cat([p[1] for p in parts]).to(torch.int64).cpu()})
    bar.close()
    barrier()
    if rank == 0:
        shards = [torch.load(shard_dir / f"shard-{s:05d}-{key}.pt") for s in range(n_shards)]
        merged = {"meta": meta, "index": torch.arange(n_images, dtype=torch.int64),
                  **{k: torch.cat([sh[k] for sh in shards]) for k in ("patch_order", "unit_order", "unit_scores", "labels")}}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        save_torch_atomic(out_path, merged)
        shutil.rmtree(shard_dir)
    barrier()
    return out_path


@dataclass
class Ranking:
    meta: dict
    patch_order: Tensor  # [N_images, N_patches] least important first
    unit_order: Tensor
    unit_scores: Tensor
    labels: Tensor


def load_ranking(path: str | Path, *, n_patches: Optional[int] = None) -> Ranking:
    """A golden ranking file, checked; one clear error if it is missing, not one, or not a ranking of `n_patches`
    patches (the model it will prune) whose every row is an order of all of them."""
    path = Path(path)
    if not path.is_file():
        raise ClipPruneError(f"no golden ranking at {path}: run the golden stage first (dvc repro golden)")
    try:
        d = torch.load(path)
        assert d["meta"]["format"] == FORMAT
        r = Ranking(meta=d["meta"], patch_order=d["patch_order"].long(), unit_order=d["unit_order"].long(),
                    unit_scores=d["unit_scores"], labels=d["labels"])
    except Exception:
        raise ClipPruneError(f"{path} is not a clipprune golden ranking file ({FORMAT})") from None
    rerun = "rerun the golden stage (dvc repro -f golden)"
    order = r.patch_order
    if order.ndim != 2 or len(r.labels) != len(order) or r.unit_order.shape[0] != len(order):
        raise ClipPruneError(f"{path}: patch_order has shape {tuple(order.shape)} for {len(r.labels)} images; {rerun}")
    if n_patches is not None and order.shape[1] != n_patches:
        raise ClipPruneError(f"{path} ranks {order.shape[1]} patches per image, the model has {n_patches}: it was "
                             f"searched for another model or image size; {rerun}")
    n = order.shape[1]
    is_order = (order.sort(dim=1).values == torch.arange(n)).all(dim=1)  # every row: each patch exactly once
    if not is_order.all():
        i = int((~is_order).nonzero()[0])
        what = f"indices outside [0, {n})" if ((order[i] < 0) | (order[i] >= n)).any() else "repeated patches"
        raise ClipPruneError(f"{path}: patch_order of image {i} has {what}; {rerun}")
    return r
