"""Phase II: a lightweight network that predicts the Golden Ranking from the layer-L tokens of the same CLIP.

    predictor, history = train_predictor(model=clip, dataset=train, ranking=load_ranking(path), layer=3, keep=0.6)
    save_predictor("models/predictor.pt", predictor, {"layer": 3, "keep": 0.6})
    prune(clip, build_method("predictor", path="models/predictor.pt"), keep=0.6, layer=3)

Input: the tokens at the input of block L (CLS first), i.e. exactly what the selector is about to prune, so
the features cost nothing at inference. The official script instead ran a second, full timm ViT (with LAION
weights) and used its last block (spec §2b, §5.7 #7), which would cancel the speed-up.

Architecture (the official `Predictor`, spec §2b): channel reduction D -> d, one MLP-Mixer block over the
1+N tokens (LayerNorm -> token MLP 1+N -> d/2 -> 1+N; LayerNorm -> channel MLP d -> 4d -> d; both residual),
drop CLS, Linear(d, 1): one score per patch, higher = keep. The reduction is a learned LayerNorm + Linear
(`reduce="linear"`, default) or the official AdaptiveAvgPool1d (`reduce="avgpool"`, a mean over groups of
D/d channels). On ViT-B-16 it costs ~0.018 GMACs, ~0.15% of the model pruned at keep 0.6 from block 3.

Losses (LOSSES, chosen by name) see predicted scores [B, N] and the golden elimination order [B, N]
(least important first): `topset_kl` (the official one, budget from keep), `listnet`, `pairwise`.
Fidelity: top-k overlap of the keep sets at the budget and Kendall's tau against the golden order.

Training caches the tokens of every ranked image once, on disk (token_store.py: 0.6 MB an image at ViT-B/16), and
reads them back one mini-batch at a time, so host RAM does not grow with the number of ranked images.
"""
from __future__ import annotations

import inspect
import math
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import vit as V
from .errors import ClipPruneError
from .io import save_torch_atomic
from .methods import ranking_scores
from .precision import autocast
from .precision import resolve as resolve_precision
from .token_store import TokenStore, check_space

FORMAT = "clipprune-predictor-v1"


# ------------------------------------------------------------------------------------------------ network
class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    """timm's MixerBlock(dim, seq_len, mlp_ratio=(0.5, 4.0)): token mixing, then channel mixing."""

    def __init__(self, *, dim: int, seq_len: int, token_ratio: float = 0.5, channel_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(seq_len, int(token_ratio * dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, int(channel_ratio * dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


REDUCTIONS = ("linear", "avgpool")


class RankPredictor(nn.Module):
    """Layer-L tokens [B, 1+N, D] (CLS first) -> patch scores [B, N], higher = more important (keep)."""

    def __init__(self, *, seq_len: int, width: int, d: int = 64, reduce: str = "linear", token_ratio: float = 0.5,
                 channel_ratio: float = 4.0):
        super().__init__()
        if reduce not in REDUCTIONS:
            raise ClipPruneError(f"predictor reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
        if not (isinstance(d, int) and d >= 2):
            raise ClipPruneError(f"predictor d must be an integer >= 2, got {d!r}")
        if reduce == "avgpool" and width % d:
            raise ClipPruneError(f"predictor reduce 'avgpool' needs d to divide the width {width}, got d={d}")
        # Everything needed to rebuild the module: saved beside the weights.
        self.arch = dict(seq_len=seq_len, width=width, d=d, reduce=reduce, token_ratio=token_ratio,
                         channel_ratio=channel_ratio)
        self.config: dict[str, Any] = {}  # how it was trained (layer, keep, loss, ...); filled by training/loading
        if reduce == "linear":
            # Layer-L tokens are not normalised (the next block's ln_1 would do it) and carry large outlier
            # channels; normalising first keeps the learned projection well conditioned.
            self.reduce = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d))
        else:
            self.reduce = None
        self.mixer = MixerBlock(dim=d, seq_len=seq_len, token_ratio=token_ratio, channel_ratio=channel_ratio)
        self.head = nn.Linear(d, 1)

    @classmethod
    def for_vit(cls, vit, **kw: Any) -> "RankPredictor":
        vit = V.check_vit(vit)
        return cls(seq_len=V.num_patches(vit) + 1, width=vit.transformer.width, **kw)

    def forward(self, x: Tensor) -> Tensor:
        b, t, w = x.shape
        if (t, w) != (self.arch["seq_len"], self.arch["width"]):
            raise ClipPruneError(f"predictor expects tokens [B, {self.arch['seq_len']}, {self.arch['width']}], got {list(x.shape)}")
        if self.reduce is None:  # AdaptiveAvgPool1d(d) over channels == mean of groups of width/d channels
            x = x.view(b, t, self.arch["d"], w // self.arch["d"]).mean(-1)
        else:
            x = self.reduce(x)
        x = self.mixer(x)
        return self.head(x[:, 1:]).squeeze(-1)

    def macs(self) -> float:
        """Multiply-adds for one image, counted as fvcore counts them (Linear in*out per token, LayerNorm 5
        per element; GELU, residual adds and the channel mean are free), so the analytic FLOP model agrees."""
        a = self.arch
        t, w, d = a["seq_len"], a["width"], a["d"]
        th, ch = int(a["token_ratio"] * d), int(a["channel_ratio"] * d)
        reduce = 5 * t * w + t * w * d if a["reduce"] == "linear" else 0
        mixer = 5 * t * d + 2 * d * t * th + 5 * t * d + 2 * t * d * ch
        return float(reduce + mixer + (t - 1) * d)


@contextmanager
def constant_weights(module: nn.Module):
    """While fvcore traces, a predictor's weights become graph constants, which must not require grad."""
    flags = [(p, p.requires_grad) for p in module.parameters()] if torch.jit.is_tracing() else []
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def save_predictor(path: str | Path, predictor: RankPredictor, config: Optional[dict] = None) -> Path:
    """Only the predictor: its architecture, weights and training config (never the CLIP), atomically."""
    config = dict(predictor.config if config is None else config)
    return save_torch_atomic(path, {"format": FORMAT, "arch": dict(predictor.arch), "config": config,
                                    "state_dict": {k: v.detach().cpu() for k, v in predictor.state_dict().items()}})


def load_predictor(path: str | Path) -> RankPredictor:
    """A predictor saved by `save_predictor` (eval mode, `.config` restored); one clear error otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ClipPruneError(f"no predictor at {path}: run the predictor stage first (dvc repro predictor)")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        assert d["format"] == FORMAT
        predictor = RankPredictor(**d["arch"])
        predictor.load_state_dict(d["state_dict"])
    except Exception:
        raise ClipPruneError(f"{path} is not a clipprune predictor file ({FORMAT})") from None
    predictor.config = dict(d["config"])
    return predictor.eval()


# ------------------------------------------------------------------------------------------------- losses
def topset_logits(order: Tensor, *, keep: float) -> Tensor:
    """The official top-set target logits [B, N]: 0 on the golden keep set (the last round(keep*N) entries of
    the elimination order), -5 - 0.1*j on the pruned patches, j = position in the most-important-first list."""
    n = order.shape[1]
    pos = ranking_scores(order)  # [B, N]: 0 = eliminated first
    j = (n - 1) - pos  # official list position: kept tokens first, earliest-pruned last
    kept = pos >= n - V.keep_count(keep, n)
    return torch.where(kept, torch.zeros_like(j), -5.0 - 0.1 * j)


def topset_kl(pred: Tensor, order: Tensor, *, keep: float, gen: Optional[torch.Generator] = None) -> Tensor:
    """Listwise "top-set" KL (official train_predictor.py), with the budget from `keep` instead of 50/196.

    target = softmax(topset_logits): ~uniform mass on the golden keep set, ~0 elsewhere;
    loss = KL(target || softmax(pred)), summed over patches, averaged over the batch. Only the keep/prune
    split matters: the order within the keep set is not learned (the official code scrambled it anyway).
    """
    target = topset_logits(order, keep=keep).softmax(dim=1)
    return F.kl_div(pred.float().log_softmax(dim=1), target, reduction="batchmean")


def listnet(pred: Tensor, order: Tensor, *, keep: float, temperature: float = 0.2,
            gen: Optional[torch.Generator] = None) -> Tensor:
    """ListNet top-one cross-entropy (Cao et al. 2007) over the whole golden order; `keep` is not used.

    target = softmax(importance / temperature), importance = position in the elimination order scaled to
    [0, 1] (1 = most important); loss = -sum target * log_softmax(pred), averaged over the batch. A smaller
    temperature concentrates the target on the most important patches.
    """
    n = order.shape[1]
    target = (ranking_scores(order) / max(1, n - 1) / temperature).softmax(dim=1)
    return -(target * pred.float().log_softmax(dim=1)).sum(dim=1).mean()


def pairwise(pred: Tensor, order: Tensor, *, keep: float, margin: float = 1.0, n_pairs: int = 1000,
             gen: Optional[torch.Generator] = None) -> Tensor:
    """Margin ranking on sampled pairs (the official commented-out alternative); `keep` is not used.

    Per image, `n_pairs` ordered pairs of distinct positions of the golden order are drawn uniformly (from
    `gen`, so a seed fixes them); the patch eliminated later (more important) must outscore the other by
    `margin`: mean of relu(margin - (s_hi - s_lo)) over pairs and images.
    """
    b, n = order.shape
    i = torch.randint(n, (b, n_pairs), generator=gen)
    j = (i + torch.randint(1, n, (b, n_pairs), generator=gen)) % n  # != i: uniform over distinct pairs
    hi, lo = torch.maximum(i, j).to(order.device), torch.minimum(i, j).to(order.device)
    s_hi, s_lo = pred.gather(1, order.gather(1, hi)), pred.gather(1, order.gather(1, lo))
    return F.relu(margin - (s_hi - s_lo).float()).mean()


LOSSES: dict[str, Callable[..., Tensor]] = {"topset_kl": topset_kl, "listnet": listnet, "pairwise": pairwise}


def get_loss(name: str, **opts: Any) -> Callable[..., Tensor]:
    """loss(pred, order, *, keep, gen) for a registry name and its options; one clear error for bad ones."""
    if name not in LOSSES:
        raise ClipPruneError(f"unknown predictor loss {name!r}; choose one of: {', '.join(LOSSES)}")
    fn = LOSSES[name]
    known = set(inspect.signature(fn).parameters) - {"pred", "order", "keep", "gen"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ClipPruneError(f"predictor loss {name!r} has no option {', '.join(unknown)}; it takes: {', '.join(sorted(known)) or 'none'}")
    return lambda pred, order, *, keep, gen=None: fn(pred, order, keep=keep, gen=gen, **opts)


# ------------------------------------------------------------------------------------------------ fidelity
def kendall_tau(x: Tensor, y: Tensor, *, chunk: int = 64) -> Tensor:
    """Kendall's tau-b between the rows of x and y ([B, N]) -> [B]; 0 where a row is constant (undefined).

    All N^2 pair signs at once (fine for N <= 196); rows in chunks to bound memory.
    """
    out = []
    n = x.shape[1]
    pairs = n * (n - 1) / 2
    for s in range(0, x.shape[0], chunk):
        a, b = x[s : s + chunk].double(), y[s : s + chunk].double()
        da = (a[:, :, None] - a[:, None, :]).sign()
        db = (b[:, :, None] - b[:, None, :]).sign()
        concord = (da * db).sum(dim=(1, 2)) / 2  # concordant minus discordant pairs (each pair counted twice)
        ties_a = ((da == 0).sum(dim=(1, 2)) - n) / 2  # minus the diagonal
        ties_b = ((db == 0).sum(dim=(1, 2)) - n) / 2
        den = ((pairs - ties_a) * (pairs - ties_b)).sqrt()
        out.append(torch.where(den > 0, concord / den.clamp_min(1e-12), torch.zeros_like(den)))
    return torch.cat(out).float()


def topk_overlap(pred: Tensor, order: Tensor, *, keep: float) -> Tensor:
    """|predicted keep set ∩ golden keep set| / n_keep per image ([B]); ties broken as keep_top_scores does."""
    n = order.shape[1]
    k = V.keep_count(keep, n)
    picked = torch.zeros_like(order, dtype=torch.bool)
    picked.scatter_(1, pred.sort(dim=1, descending=True, stable=True).indices[:, :k], True)
    return picked.gather(1, order[:, n - k :]).float().sum(dim=1) / k


def fidelity(pred_scores: Tensor, golden_order: Tensor, *, keep: float) -> dict[str, float]:
    """Mean top-k overlap at the keep budget and mean Kendall tau of the scores against golden importance."""
    order = golden_order.long().to(pred_scores.device)
    return {"topk_overlap": topk_overlap(pred_scores, order, keep=keep).mean().item(),
            "kendall_tau": kendall_tau(pred_scores, ranking_scores(order)).mean().item()}


# ------------------------------------------------------------------------------------------------ training
def _images(batch: list) -> Tensor:
    """collate_fn: the images of (image, label) items; labels may be anything (a module function: workers pickle it)."""
    return torch.stack([item[0] for item in batch])


def token_dtype(precision: str, device: str | torch.device) -> torch.dtype:
    """How cached tokens are stored: float32 at fp32/tf32 (exact); under half-precision autocast the autocast
    dtype, whose precision the tower's outputs do not exceed anyway (and the cache is half the size)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, device), torch.float32)


@torch.no_grad()
def layer_tokens(model, dataset, *, layer: int, batch_size: int = 64, device: str | torch.device = "cpu",
                 progress: bool = False, precision: str = "fp32", workers: int = 0,
                 out: Optional[str | Path] = None) -> Tensor | TokenStore:
    """Tokens at the input of block `layer` ([M, 1+N, D], CPU) for every image of a map-style dataset: exactly
    what a selector at `layer` sees, computed once so training never reruns the CLIP.

    Images are decoded by a DataLoader (`workers` processes; the same order for any count) and the tower runs at
    `precision` on `device`. `out`: a directory for a TokenStore (host RAM bounded by one batch; the caller closes
    it), or None for one in-RAM tensor (small sets, tests). float32 at fp32, else see `token_dtype`."""
    from tqdm import tqdm

    vit = V.check_vit(model)
    V.check_setting(vit, keep=1.0, layer=layer)
    dev = torch.device(device)
    dtype, store_dtype = vit.conv1.weight.dtype, token_dtype(precision, dev)
    m, row_shape = len(dataset), (V.num_patches(vit) + 1, vit.transformer.width)
    # Both sinks are filled in place: no list of batches and no torch.cat, whose peak was twice the cache.
    cache = TokenStore(rows=m, row_shape=row_shape, dtype=store_dtype, directory=out) if out is not None \
        else torch.empty((m, *row_shape), dtype=store_dtype)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=_images, pin_memory=dev.type == "cuda")
    was_training = vit.training
    vit.eval()  # no patch dropout: the features are a fixed function of the image
    s = 0
    try:
        for images in tqdm(loader, desc="predictor tokens", disable=not progress, mininterval=5.0):
            with autocast(precision, dev):
                x = V.run_blocks(vit, vit._embeds(images.to(device=dev, dtype=dtype, non_blocking=True)), stop=layer)
            x = x.to("cpu", store_dtype)
            if store_dtype == torch.float16 and not torch.isfinite(x).all():  # beyond float16's range (65504)
                raise ClipPruneError(f"layer-{layer} tokens overflow float16 at compute.precision={precision}; "
                                     f"use compute.precision=bf16 or fp32")
            if out is not None:
                cache.append(x)
            else:
                cache[s : s + len(x)] = x
            s += len(x)
    except BaseException:
        if out is not None:
            cache.close()
        raise
    finally:
        vit.train(was_training)
    return cache


@torch.no_grad()
def predict_scores(predictor: nn.Module, tokens: Tensor | TokenStore, *, batch_size: int = 256) -> Tensor:
    """Predicted scores [M, N] for cached tokens [M, 1+N, D] (a tensor or a TokenStore), in batches, on the
    predictor's device (fidelity is computed there too)."""
    p = next(predictor.parameters())
    was_training = predictor.training
    predictor.eval()
    out = [predictor(tokens[s : s + batch_size].to(p.device, p.dtype)).float()
           for s in range(0, len(tokens), batch_size)]
    predictor.train(was_training)
    return torch.cat(out)


def fit(*, tokens: Tensor | TokenStore, orders: Tensor, keep: float, loss: str = "topset_kl",
        loss_opts: Optional[dict] = None, epochs: int = 50, lr: float = 1e-3, weight_decay: float = 1e-4,
        batch_size: int = 32, d: int = 64, reduce: str = "linear", seed: int = 0,
        test: Optional[tuple[Tensor | TokenStore, Tensor]] = None,
        log_dir: Optional[str | Path] = None, device: str | torch.device = "cpu",
        progress: bool = True) -> tuple[RankPredictor, dict]:
    """Train a RankPredictor on cached tokens [M, 1+N, D] (a tensor, or a TokenStore read one mini-batch at a
    time) and golden orders [M, N]; see `train_predictor`."""
    from tqdm import tqdm

    if len(tokens.shape) != 3 or orders.shape != (tokens.shape[0], tokens.shape[1] - 1):
        raise ClipPruneError(f"predictor: tokens {list(tokens.shape)} and golden orders {list(orders.shape)} do not match")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not (isinstance(value, int) and value >= 1):
            raise ClipPruneError(f"predictor: {name} must be an integer >= 1, got {value!r}")
    if not lr > 0:
        raise ClipPruneError(f"predictor: lr must be > 0, got {lr!r}")
    if not 0.0 < keep <= 1.0:
        raise ClipPruneError(f"predictor: keep must be in (0, 1], got {keep!r}")
    loss_fn = get_loss(loss, **(loss_opts or {}))
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        predictor = RankPredictor(seq_len=tokens.shape[1], width=tokens.shape[2], d=d, reduce=reduce).to(dev)
    orders = orders.long()
    opt = torch.optim.Adam(predictor.parameters(), lr=lr, weight_decay=weight_decay)
    # Official schedule: cosine over the epochs, stepped per epoch, floor at lr/10 (their 1e-3 -> 1e-4).
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.1 * lr)
    gen = torch.Generator().manual_seed(seed)  # shuffling and pair sampling
    predictor.config = {"keep": keep, "loss": loss, "loss_opts": dict(loss_opts or {}), "epochs": epochs, "lr": lr,
                        "weight_decay": weight_decay, "batch_size": batch_size, "d": d, "reduce": reduce,
                        "seed": seed, "n_train": int(tokens.shape[0])}

    live = None
    if log_dir is not None:
        from dvclive import Live
        # dvcyaml=False: the pipeline's dvc.yaml declares our outputs; dvclive must not rewrite it.
        live = Live(dir=str(log_dir), dvcyaml=False, save_dvc_exp=False)

    history: dict[str, list] = {"loss": [], "lr": [], "test": []}
    n_batches = math.ceil(len(tokens) / batch_size)
    bar = tqdm(total=epochs * n_batches, desc="predictor", disable=not progress, mininterval=5.0)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        predictor.train()
        perm = torch.randperm(len(tokens), generator=gen)
        total, seen = 0.0, 0
        history["lr"].append(opt.param_groups[0]["lr"])
        for s in range(0, len(tokens), batch_size):
            idx = perm[s : s + batch_size]
            # float32 whatever the cache stores (a no-op for a float32 tensor: the same x as ever).
            x, order = tokens[idx].to(dev, torch.float32), orders[idx].to(dev)
            loss_value = loss_fn(predictor(x), order, keep=keep, gen=gen)
            opt.zero_grad(set_to_none=True)
            loss_value.backward()
            opt.step()
            total, seen = total + loss_value.item() * len(idx), seen + len(idx)
            bar.update(1)
        sched.step()
        history["loss"].append(total / seen)
        bar.set_postfix(epoch=epoch, loss=f"{history['loss'][-1]:.4f}", refresh=False)
        if test is not None:
            history["test"].append(fidelity(predict_scores(predictor, test[0]), test[1], keep=keep))
        if live is not None:
            live.step = epoch
            live.log_metric("predictor/loss", history["loss"][-1])
            live.log_metric("predictor/lr", history["lr"][-1])
            for k, v in (history["test"][-1] if test is not None else {}).items():
                live.log_metric(f"test/{k}", v)
            live.sync()
    bar.close()
    history["train_seconds"] = time.perf_counter() - t0
    predictor.eval()
    if live is not None:
        live.summary["train_seconds"] = history["train_seconds"]
        live.end()
    return predictor, history


def train_predictor(*, model, dataset, ranking, layer: int, keep: float, loss: str = "topset_kl",
                    epochs: int = 50, lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 32, d: int = 64,
                    seed: int = 0, log_dir: Optional[str | Path] = None, loss_opts: Optional[dict] = None,
                    reduce: str = "linear", test_dataset=None, test_ranking=None, device: str | torch.device = "cpu",
                    precision: str = "fp32", workers: int = 0, tmp_dir: Optional[str | Path] = None,
                    progress: bool = True) -> tuple[RankPredictor, dict]:
    """Train a predictor of `ranking` (golden.Ranking of `dataset`, row i = item i) on the frozen CLIP's tokens
    at the input of block `layer`, computed at `precision` on `device`. Adam + per-epoch cosine; deterministic for
    a seed. With a test set and its ranking, every epoch logs the test fidelity. The tokens are cached in
    TokenStores under `tmp_dir` (default: TMPDIR), deleted on return or on error, so host RAM does not grow with
    the number of images. Returns (predictor in eval mode, history)."""
    sets = [(dataset, ranking, "train")] + ([(test_dataset, test_ranking, "test")] if test_dataset is not None else [])
    if (test_dataset is None) != (test_ranking is None):
        raise ClipPruneError("predictor: give both test_dataset and test_ranking, or neither")
    for ds, rk, split in sets:
        if len(rk.patch_order) != len(ds):
            raise ClipPruneError(f"predictor: the {split} ranking has {len(rk.patch_order)} rows but the dataset has "
                                 f"{len(ds)} images; pass the ranked images (e.g. Subset(ds, range({len(rk.patch_order)})))")
        searched = rk.meta.get("search", {}).get("layer", layer)
        if searched != layer:
            raise ClipPruneError(f"predictor: the {split} ranking was searched at layer {searched}, not {layer}")
    vit = V.check_vit(model)
    tmp_dir = Path(tmp_dir if tmp_dir is not None else tempfile.gettempdir())
    row_bytes = (V.num_patches(vit) + 1) * vit.transformer.width * token_dtype(precision, device).itemsize
    # Both caches at once, before any compute (each store checks its own share again when it is made).
    check_space(tmp_dir, sum(len(ds) for ds, _, _ in sets) * row_bytes, what="the predictor's token caches")
    with ExitStack() as stores:  # closing a store deletes its file, on an error too
        cached = [(stores.enter_context(layer_tokens(model, ds, layer=layer, batch_size=max(batch_size, 64),
                                                     device=device, progress=progress, precision=precision,
                                                     workers=workers, out=tmp_dir)), rk.patch_order.long())
                  for ds, rk, _ in sets]
        predictor, history = fit(tokens=cached[0][0], orders=cached[0][1], keep=keep, loss=loss, loss_opts=loss_opts,
                                 epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, d=d,
                                 reduce=reduce, seed=seed, test=cached[1] if len(cached) > 1 else None,
                                 log_dir=log_dir, device=device, progress=progress)
    predictor.config["layer"] = layer
    if resolve_precision(precision, device) != "fp32":  # fp32 predictors keep the config (and bytes) they always had
        predictor.config["precision"] = resolve_precision(precision, device)
    return predictor, history
