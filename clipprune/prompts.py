"""Phase III: learnable tokens on a frozen, pruned CLIP. VPT-style visual tokens, CoOp text context.

    tuned = tune(model=model, tokenizer=tok, train_set=ds, classnames=names, method=build_method("random"),
                 keep=0.5, layer=3, visual={"n": 8, "deep": True}, text={"init": "a photo of a"},
                 shots=16, epochs=5, lr=2e-3, batch_size=4, seed=0)
    tuned.apply(model)                                    # prune as tuned, then attach the visual tokens
    w = tuned.classifier(model, tok, names)               # [D, C] zero-shot classifier

Visual tokens enter at the input of the pruning block L, after selection. Nothing ranks or prunes them, and
they are dropped before pooling (clipprune.vit), so with a CLS-pooled tower they act only through attention.
The text context replaces the hand-written template. open_clip's text tower modules run on the embedding
sequence we build here; open_clip itself is not modified.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, text_global_pool
from torch import Tensor, nn

from . import methods as M
from . import vit as V
from .errors import ClipPruneError
from .io import save_torch_atomic
from .precision import autocast, grad_scaler

FORMAT = "clipprune-tokens/1"
DEFAULT_TEMPLATES = ("a photo of a {c}.",)
_PLACEHOLDER = "X"  # CoOp's stand-in word for the context slots; its embeddings are swapped out


# --------------------------------------------------------------------------------------------------------------
# Visual tokens


class VisualTokens(nn.Module):
    """`n` learnable tokens of the ViT width, appended at the input of block `layer` after selection.

    Shallow: one set, appended once and carried through the remaining blocks.
    Deep (VPT-deep): that set, then a fresh set swapped in at the input of every block from
    max(layer + 1, depth_from) on. Blocks between layer and depth_from carry the first set.
    Init: normal with std `std`, drawn from a generator seeded with `seed`.
    """

    def __init__(self, *, n: int, width: int, depth: int, layer: int, deep: bool = False, depth_from: int = 0,
                 seed: int = 0, std: float = 0.02):
        super().__init__()
        if not (isinstance(n, int) and n >= 0):
            raise ClipPruneError(f"visual tokens: n must be an integer >= 0, got {n!r}")
        if not (isinstance(layer, int) and 0 <= layer < depth):
            raise ClipPruneError(f"visual tokens: layer must be in [0, {depth}), got {layer!r}")
        if not (isinstance(depth_from, int) and 0 <= depth_from <= depth):
            raise ClipPruneError(f"visual tokens: depth_from must be in [0, {depth}], got {depth_from!r}")
        self.n, self.width, self.depth, self.layer = n, width, depth, layer
        self.deep, self.depth_from, self.seed, self.std = bool(deep), depth_from, seed, std
        # blocks[j] is the block whose input gets sets[j]: blocks[0] = layer (appended), the rest replace.
        self.blocks = [layer] + (list(range(max(layer + 1, depth_from), depth)) if deep else [])
        gen = torch.Generator().manual_seed(seed)
        # One Parameter per set (not one stacked tensor): the spec holds leaves, never stale views.
        self.sets = nn.ParameterList([nn.Parameter(torch.randn(n, width, generator=gen) * std)
                                      for _ in (self.blocks if n else [])])

    @classmethod
    def for_model(cls, model: Any, *, layer: int, n: int, deep: bool = False, depth_from: int = 0,
                  seed: int = 0, std: float = 0.02) -> "VisualTokens":
        vit = V.check_vit(model)
        return cls(n=n, width=vit.transformer.width, depth=V.depth(vit), layer=layer, deep=deep,
                   depth_from=depth_from, seed=seed, std=std)

    def config(self) -> dict:
        """The constructor's arguments: enough to rebuild this module before loading its state."""
        return {"n": self.n, "width": self.width, "depth": self.depth, "layer": self.layer, "deep": self.deep,
                "depth_from": self.depth_from, "seed": self.seed, "std": self.std}

    def extra_repr(self) -> str:
        return f"n={self.n}, layer={self.layer}, blocks={self.blocks if self.n else []}"


def attach(model: Any, tokens: Optional[VisualTokens]) -> V.VisionTransformer:
    """Hang `tokens` on a model already pruned with `methods.prune`; None or n = 0 leaves the pruned model as is.

    The tokens enter at the spec's layer (ToMe's is 0), so build them with `layer=` that layer.
    """
    vit = V.check_vit(model)
    if not V.is_patched(vit):
        raise ClipPruneError("attach visual tokens to a pruned model: call methods.prune(model, method, ...) first")
    spec: V.PruneSpec = vit._clipprune
    if tokens is None or tokens.n == 0:
        spec.extra_tokens, spec.deep_tokens = None, {}
        return vit
    if (tokens.width, tokens.depth) != (vit.transformer.width, V.depth(vit)):
        raise ClipPruneError(f"visual tokens were built for width {tokens.width}, depth {tokens.depth}; "
                             f"this ViT has width {vit.transformer.width}, depth {V.depth(vit)}")
    if tokens.layer != spec.layer:
        raise ClipPruneError(f"visual tokens enter at block {tokens.layer} but this pruned model selects at block "
                             f"{spec.layer}; build the tokens with layer={spec.layer}")
    if spec.run_block is not None and spec.info.get("method") != "tome":
        # ToMe keeps the extra tokens out of its merges (methods.tome_block's protect_last); others may not.
        raise ClipPruneError(f"method {spec.info.get('method')!r} runs its own blocks and may merge the visual "
                             "tokens; only tome is supported among merging methods")
    spec.extra_tokens = tokens.sets[0]
    spec.deep_tokens = dict(zip(tokens.blocks[1:], tokens.sets[1:]))
    return vit


# --------------------------------------------------------------------------------------------------------------
# Text context (CoOp)


@dataclass
class _TextTower:
    """The pieces of an open_clip text tower that encode_text runs, wherever the model keeps them."""

    token_embedding: nn.Embedding
    positional_embedding: Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Any
    attn_mask: Optional[Tensor]
    pool_type: str
    eos_id: Optional[int]


def _text_tower(model: Any) -> _TextTower:
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):  # CustomTextCLIP
        if text.cls_emb is not None or text.use_pad_mask:
            raise ClipPruneError("learnable text context does not support CoCa-style text towers (cls token, pad mask)")
        return _TextTower(text.token_embedding, text.positional_embedding, text.transformer, text.ln_final,
                          text.text_projection, text.attn_mask, text.pool_type, text.eos_id)
    if all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
        return _TextTower(model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
                          model.text_projection, model.attn_mask, model.text_pool_type,
                          getattr(model, "text_eos_id", None))
    raise ClipPruneError(f"learnable text context needs an open_clip text tower, got {type(model).__name__}")


class TextContext(nn.Module):
    """CoOp: `n_ctx` context vectors shared by all classes, in place of the hand-written template.

    prompt = [SOS] ctx_1 .. ctx_n classname . [EOS]. Init: normal (std, seeded), or via `build` the token
    embeddings of a phrase ("a photo of a" -> 4 vectors), which reproduces the template "a photo of a {c}.".
    """

    def __init__(self, *, n_ctx: int, width: int, init: Optional[str] = None, seed: int = 0, std: float = 0.02):
        super().__init__()
        if not (isinstance(n_ctx, int) and n_ctx >= 1):
            raise ClipPruneError(f"text context: n_ctx must be an integer >= 1, got {n_ctx!r}")
        self.n_ctx, self.width, self.init, self.seed, self.std = n_ctx, width, init, seed, std
        gen = torch.Generator().manual_seed(seed)
        self.ctx = nn.Parameter(torch.randn(n_ctx, width, generator=gen) * std)

    @classmethod
    def build(cls, model: Any, tokenizer, *, n_ctx: Optional[int] = None, init: Optional[str] = None,
              seed: int = 0, std: float = 0.02) -> "TextContext":
        """A context for `model`'s text tower: random (n_ctx, default 16 as CoOp) or from the phrase `init`."""
        tower = _text_tower(model)
        width = tower.token_embedding.weight.shape[1]
        if init is None:
            return cls(n_ctx=16 if n_ctx is None else n_ctx, width=width, seed=seed, std=std)
        ids = tokenizer([init]).to(tower.token_embedding.weight.device)
        words = ids[0, 1:_eot_positions(ids, tower)[0]]  # between SOS and EOT
        if n_ctx is not None and n_ctx != len(words):
            raise ClipPruneError(f"text context: init {init!r} is {len(words)} tokens but n_ctx = {n_ctx}; "
                                 "drop n_ctx or make them agree")
        ctx = cls(n_ctx=len(words), width=width, init=init, seed=seed, std=std)
        with torch.no_grad():
            ctx.ctx.copy_(tower.token_embedding(words).float())
        return ctx

    def config(self) -> dict:
        return {"n_ctx": self.n_ctx, "width": self.width, "init": self.init, "seed": self.seed, "std": self.std}

    def prompt_ids(self, tokenizer, classnames: Sequence[str]) -> Tensor:
        """Token ids [C, context] of "X .. X classname."; the n_ctx X slots are where the context goes.

        Tokenising is slow (pure-Python BPE): compute once per class list and pass to `classifier(ids=)`.
        """
        ids = tokenizer([" ".join([_PLACEHOLDER] * self.n_ctx) + f" {c}." for c in classnames])
        slot = tokenizer([_PLACEHOLDER])[0, 1]
        if not bool((ids[:, 1 : 1 + self.n_ctx] == slot).all()):
            raise ClipPruneError("text context: this tokenizer does not start prompts with one SOS token followed "
                                 "by the context words; use an open_clip CLIP tokenizer")
        return ids

    def text_features(self, model: Any, ids: Tensor) -> Tensor:
        """Unnormalised text embeddings [C, D] of the prompts `ids` with the context vectors in their slots."""
        tower = _text_tower(model)
        ids = ids.to(tower.token_embedding.weight.device)
        if ids.shape[1] != tower.positional_embedding.shape[0]:
            raise ClipPruneError(f"text context: tokenizer gives {ids.shape[1]} positions, the text tower has "
                                 f"{tower.positional_embedding.shape[0]}; set the tokenizer's context_length")
        too_long = _eot_positions(ids, tower) <= self.n_ctx + 1
        if bool(too_long.any()):
            raise ClipPruneError(f"text context: {int(too_long.sum())} class prompt(s) do not fit the context length "
                                 f"after {self.n_ctx} context tokens; use fewer context tokens")
        cast = tower.transformer.get_cast_dtype()
        emb = tower.token_embedding(ids).to(cast)
        ctx = self.ctx.to(cast).expand(ids.shape[0], -1, -1)
        x = torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx :]], dim=1)
        # From here on, exactly open_clip's encode_text.
        x = x + tower.positional_embedding.to(cast)
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        x = tower.ln_final(x)
        x = text_global_pool(x, ids, tower.pool_type, eos_token_id=tower.eos_id)
        if tower.text_projection is not None:
            x = tower.text_projection(x) if isinstance(tower.text_projection, nn.Linear) else x @ tower.text_projection
        return x

    def classifier(self, model: Any, tokenizer, classnames: Sequence[str], *, ids: Optional[Tensor] = None) -> Tensor:
        """The zero-shot classifier [D, C]: normalised class embeddings, as zeroshot.classifier_weights gives."""
        ids = self.prompt_ids(tokenizer, classnames) if ids is None else ids
        return F.normalize(self.text_features(model, ids), dim=-1).T

    def extra_repr(self) -> str:
        return f"n_ctx={self.n_ctx}, init={self.init!r}"


def _eot_positions(ids: Tensor, tower: _TextTower) -> Tensor:
    """Where each row's pooled (EOT) token sits, found as open_clip's text_global_pool finds it."""
    if tower.pool_type == "eos":
        return (ids == tower.eos_id).int().argmax(dim=-1)
    if tower.pool_type != "argmax":
        raise ClipPruneError(f"text context needs an argmax- or eos-pooled text tower, "
                             f"got pool_type {tower.pool_type!r}")
    return ids.argmax(dim=-1)


# --------------------------------------------------------------------------------------------------------------
# The container


class TunedTokens(nn.Module):
    """Optional visual tokens + optional text context + the config they were made with.

    state_dict holds only the learned tensors; `save` writes config, history and state atomically.
    """

    def __init__(self, *, visual: Optional[VisualTokens] = None, text: Optional[TextContext] = None,
                 config: Optional[dict] = None, history: Optional[list[float]] = None,
                 method: Optional[M.Method] = None):
        super().__init__()
        self.visual, self.text = visual, text
        self.config = dict(config or {})
        self.history = list(history or [])  # mean training loss per epoch
        self.method = method  # the instance tuned with (not saved: `load` rebuilds it from config)

    def apply(self, model: Any, *, method: Optional[M.Method] = None, keep: Optional[float] = None,
              layer: Optional[int] = None) -> V.VisionTransformer:
        """Prune `model` in place as when tuned (or with the given setting), then attach the visual tokens."""
        if method is None and self.method is None:
            if "method" not in self.config:
                raise ClipPruneError("these tokens record no method: pass method=")
            self.method = M.build_method(self.config["method"]["name"], **self.config["method"]["config"])
        method = method or self.method
        keep = self.config["keep"] if keep is None else keep
        layer = self.config["layer"] if layer is None else layer
        vit = M.prune(model, method, keep=keep, layer=layer)
        return attach(vit, self.visual)

    def classifier(self, model: Any, tokenizer, classnames: Sequence[str], *,
                   templates: Optional[Sequence[str]] = None) -> Tensor:
        """[D, C]: from the learned text context, else from the templates (default: those tuned with)."""
        if self.text is not None:
            return self.text.classifier(model, tokenizer, classnames)
        from .zeroshot import classifier_weights

        templates = list(templates or self.config.get("templates") or DEFAULT_TEMPLATES)
        device = next(model.parameters()).device
        return classifier_weights(model, tokenizer, classnames, templates, device=device)

    @property
    def n_visual(self) -> int:
        return 0 if self.visual is None else self.visual.n

    def analytic_gflops(self, dims: V.ViTDims, method: M.Method, *, keep: float, layer: int) -> float:
        """The FLOP formula for `method` with these tokens, which cost from the block they enter (ToMe: 0)."""
        from .flops import analytic_gflops

        at = self.visual.layer if self.n_visual else layer
        return analytic_gflops(dims, method, keep=keep, layer=at, extra_tokens=self.n_visual)

    def save(self, path: str | Path) -> Path:
        """Only the learned tensors and the config, written atomically (never a half-written file)."""
        return save_torch_atomic(path, {"format": FORMAT, "config": self.config, "history": self.history,
                                        "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}})

    @classmethod
    def load(cls, path: str | Path, *, map_location: str | torch.device = "cpu") -> "TunedTokens":
        path = Path(path)
        if not path.is_file():
            raise ClipPruneError(f"tokens file not found: {path}")
        blob = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ClipPruneError(f"{path} is not a clipprune tokens file (format {FORMAT})")
        cfg = blob["config"]
        visual = VisualTokens(**cfg["visual"]) if cfg.get("visual") else None
        text = TextContext(**cfg["text"]) if cfg.get("text") else None
        tuned = cls(visual=visual, text=text, config=cfg, history=blob.get("history"))
        tuned.load_state_dict(blob["state_dict"])  # strict: a mismatch is an error, not a silent partial load
        return tuned


def _options(kind: str, given: Optional[dict], allowed: dict) -> Optional[dict]:
    """`given` over the defaults in `allowed`; one clear error for unknown keys."""
    if given is None:
        return None
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ClipPruneError(f"{kind} tokens have no option {', '.join(unknown)}; "
                             f"they take: {', '.join(sorted(allowed))}")
    return {**allowed, **given}


def _method_config(method: M.Method) -> dict:
    # Only plain values survive a save; a method holding other objects must be passed to apply() again.
    cfg = {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if not f.name.startswith("_")}
    return {"name": method.name, "config": {k: v for k, v in cfg.items() if isinstance(v, (bool, int, float, str))}}


def init_tokens(*, model: Any, tokenizer, method: M.Method, keep: float, layer: int, visual: Optional[dict] = None,
                text: Optional[dict] = None, seed: int = 0,
                templates: Sequence[str] = DEFAULT_TEMPLATES) -> TunedTokens:
    """Untrained tokens for `model` pruned by `method` at (keep, layer): what `tune` starts from.

    visual: {"n": 8, "deep": False, "depth_from": 0, "std": 0.02}; text: {"n_ctx": None, "init": None, "std": 0.02}.
    """
    visual = _options("visual", visual, {"n": 8, "deep": False, "depth_from": 0, "std": 0.02})
    text = _options("text", text, {"n_ctx": None, "init": None, "std": 0.02})
    vit = V.check_vit(model)
    at = method.spec(vit, keep=keep, layer=layer).layer  # where the method's spec selects (ToMe: 0)
    v = None if visual is None else VisualTokens.for_model(vit, layer=at, seed=seed, **visual)
    t = None if text is None else TextContext.build(model, tokenizer, seed=seed + 1, **text)
    config = {"method": _method_config(method), "keep": keep, "layer": layer, "templates": list(templates),
              "visual": None if v is None else v.config(), "text": None if t is None else t.config()}
    return TunedTokens(visual=v, text=t, config=config, method=method)


# --------------------------------------------------------------------------------------------------------------
# Few-shot tuning


@contextmanager
def frozen(model: nn.Module):
    """CLIP frozen for tuning: no parameter requires grad, every module in eval mode; both restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    for p in flags:
        p.requires_grad_(False)
    model.eval()  # no dropout / patch dropout: the frozen model is a fixed function of its input
    try:
        yield model
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, training in modes.items():
            m.training = training


def check_only_tokens_have_grads(model: nn.Module, tuned: TunedTokens) -> None:
    """After a backward: no CLIP parameter holds a gradient, and every learned tensor does."""
    leaked = [n for n, p in model.named_parameters() if p.grad is not None]
    if leaked:
        raise RuntimeError(f"frozen CLIP parameters received gradients: {', '.join(leaked[:5])}")
    missing = [n for n, p in tuned.named_parameters() if p.grad is None]
    if missing:
        raise RuntimeError(f"learned tokens got no gradient (they cannot reach the loss): {', '.join(missing)}")


def lr_at(step: int, *, lr: float, total: int, warmup: int = 0, warmup_lr: float = 1e-5) -> float:
    """schedule "cosine": constant warmup_lr for `warmup` steps, then cosine from lr to 0 over the remaining steps,
    updated every step."""
    if step < warmup:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def dassl_lr_at(step: int, *, lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                warmup_lr: float = 1e-5) -> float:
    """schedule "dassl": what Dassl's build_lr_scheduler gives the IVLP/VPT/CoOp configs (LR_SCHEDULER cosine,
    WARMUP_TYPE constant, WARMUP_RECOUNT true), stepped once per epoch as their trainers do (after an epoch's last
    batch). Epoch e < warmup_epochs runs at warmup_lr; then the cosine restarts its count: epoch e at
    lr * (1 + cos(pi * (e - warmup_epochs) / epochs)) / 2, T_max = MAX_EPOCH (so it never reaches 0)."""
    epoch = step // steps_per_epoch
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


DASSL_RRCROP_SCALE = (0.08, 1.0)  # Dassl's INPUT.RRCROP_SCALE default; the IVLP/VPT configs keep it


def _rgb(image):
    return image.convert("RGB")  # Dassl's read_image; a module function, so DataLoader workers can pickle it


def train_transform(augment: str, *, preprocess):
    """The few-shot training images' transform. "none": the model's own `preprocess` (what evaluation uses).
    "crop_flip": the IVLP/VPT configs' INPUT.TRANSFORMS [random_resized_crop, random_flip, normalize] as Dassl
    builds them: RandomResizedCrop(size, scale (0.08, 1), bicubic), RandomHorizontalFlip, ToTensor, Normalize,
    with the size and mean/std of `preprocess` (open_clip's Resize, CenterCrop, ..., Normalize).

    A new transform: `preprocess` itself is never changed, so evaluation never sees the augmentation."""
    if augment == "none":
        return preprocess
    if augment != "crop_flip":
        raise ClipPruneError(f"tune: augment must be 'none' or 'crop_flip', got {augment!r}")
    from torchvision import transforms as T

    steps = list(getattr(preprocess, "transforms", []))
    crop = next((t for t in steps if isinstance(t, T.CenterCrop)), None)
    norm = next((t for t in steps if isinstance(t, T.Normalize)), None)
    if crop is None or norm is None:
        raise ClipPruneError("tune.augment crop_flip reads the image size and mean/std from the model's preprocess, "
                             "which has no CenterCrop/Normalize (not open_clip's); use tune.augment none")
    return T.Compose([_rgb, T.RandomResizedCrop(crop.size, scale=DASSL_RRCROP_SCALE,
                                                interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean=norm.mean, std=norm.std)])


class _PerItemSeed(torch.utils.data.Dataset):
    """Image i of epoch e is transformed under torch's RNG seeded by (seed, e, i), the caller's RNG untouched: the
    augmentation draws are the same for any number of DataLoader workers (each would otherwise draw from its own
    stream), and a transform without randomness gives exactly what it gave before."""

    def __init__(self, items: torch.utils.data.Dataset, *, seed: int):
        self.items, self.seed, self.epoch = items, seed, 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed also queues seeds for every accelerator backend, which
            # costs more than the image's transform.
            torch.default_generator.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % (2**63))
            return self.items[i]


def tune(*, model: nn.Module, tokenizer, train_set: torch.utils.data.Dataset, classnames: Sequence[str],
         method: M.Method, keep: float, layer: int, visual: Optional[dict], text: Optional[dict], shots: int,
         epochs: int, lr: float, batch_size: int, seed: int, log_dir: Optional[str | Path] = None,
         templates: Sequence[str] = DEFAULT_TEMPLATES, optimizer: str = "sgd", momentum: float = 0.9,
         weight_decay: float = 0.0, warmup_epochs: int = 0, warmup_lr: float = 1e-5, schedule: str = "cosine",
         fewshot: str = "per_class", device: str | torch.device = "cpu", precision: str = "fp32",
         workers: int = 0, augmented: bool = True) -> TunedTokens:
    """Learn visual tokens and/or text context few-shot on the frozen CLIP pruned by `method` at (keep, layer).

    Loss: cross-entropy of logit_scale.exp() * normalised image features @ classifier (from the text context,
    else fixed from `templates`). Deterministic for a seed (it seeds torch's global RNG for the transforms).
    The shots are drawn by data.few_shot_indices(mode=fewshot); the lr follows `schedule` ("cosine": lr_at, per
    step; "dassl": dassl_lr_at, per epoch), after `warmup_epochs` at warmup_lr. Augmentation is the train_set's
    transform (see train_transform), drawn per image from (seed, epoch, index), so `workers` DataLoader processes
    change nothing; `augmented=False` says the transform draws nothing, so each shot is decoded once, not once
    per epoch. `precision`: clipprune.precision (fp16 on CUDA with a loss scaler).
    Moves `model` to `device`; leaves it unpatched, with its requires_grad flags and train/eval modes as they were.
    """
    from tqdm import tqdm

    from .data import dataset_labels, few_shot_indices
    from .zeroshot import classifier_weights

    if isinstance(method, M.RankingPruning):
        raise ClipPruneError("tune: method 'ranking' needs rankings bound per batch (methods.bound_batches), which "
                             "few-shot batches in shuffled order do not have; use random, cls_attention, tome, full or "
                             "predictor")
    if isinstance(train_set, torch.utils.data.IterableDataset):
        raise ClipPruneError("tune: few-shot sampling needs a map-style dataset, not webdataset shards")
    if schedule not in ("cosine", "dassl"):
        raise ClipPruneError(f"tune: schedule must be 'cosine' or 'dassl', got {schedule!r}")
    if optimizer not in ("sgd", "adamw"):
        raise ClipPruneError(f"tune: optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not (isinstance(value, int) and value >= 1):
            raise ClipPruneError(f"tune: {name} must be an integer >= 1, got {value!r}")
    if not lr > 0:
        raise ClipPruneError(f"tune: lr must be > 0, got {lr!r}")

    torch.manual_seed(seed)
    dev = torch.device(device)
    model.to(dev)
    tuned = init_tokens(model=model, tokenizer=tokenizer, method=method, keep=keep, layer=layer, visual=visual,
                        text=text, seed=seed, templates=templates).to(dev)
    params = list(tuned.parameters())
    if not params:
        raise ClipPruneError("tune: nothing to learn: set visual.n > 0 or give text options")
    idx = few_shot_indices(dataset_labels(train_set), shots=shots, seed=seed, mode=fewshot)
    shots_set = _PerItemSeed(torch.utils.data.Subset(train_set, idx), seed=seed)
    if not augmented:  # the same tensors every epoch: decode them once
        shots_set.items = [shots_set.items[i] for i in range(len(shots_set.items))]
    loader = torch.utils.data.DataLoader(shots_set, batch_size=batch_size, shuffle=True,
                                         num_workers=workers if augmented else 0,
                                         generator=torch.Generator().manual_seed(seed), pin_memory=dev.type == "cuda")
    scaler = grad_scaler(precision, dev)
    opt = (torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay))
    total, warmup = epochs * len(loader), warmup_epochs * len(loader)
    tuned.config.update({"classnames": list(classnames), "shots": shots, "epochs": epochs, "lr": lr,
                         "batch_size": batch_size, "seed": seed, "optimizer": optimizer, "momentum": momentum,
                         "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "warmup_lr": warmup_lr,
                         "schedule": schedule, "fewshot": fewshot, "n_train": len(idx)})

    def lr_of(step: int) -> float:
        if schedule == "dassl":
            return dassl_lr_at(step, lr=lr, epochs=epochs, steps_per_epoch=len(loader), warmup_epochs=warmup_epochs,
                               warmup_lr=warmup_lr)
        return lr_at(step, lr=lr, total=total, warmup=warmup, warmup_lr=warmup_lr)

    live = None
    if log_dir is not None:
        from dvclive import Live
        # dvcyaml=False: the pipeline's dvc.yaml declares our outputs; dvclive must not rewrite it.
        live = Live(dir=str(log_dir), dvcyaml=False, save_dvc_exp=False)

    with frozen(model):
        ids = tuned.text.prompt_ids(tokenizer, classnames) if tuned.text is not None else None
        fixed = None
        if tuned.text is None:
            fixed = classifier_weights(model, tokenizer, classnames, list(templates), device=dev)
        tuned.apply(model, method=method, keep=keep, layer=layer)
        try:
            step = 0
            bar = tqdm(total=total, desc="tune", mininterval=5.0)
            for epoch in range(epochs):
                losses = []
                shots_set.epoch = epoch  # read by the workers, which the loader starts anew each epoch
                for images, labels in loader:
                    for g in opt.param_groups:
                        g["lr"] = lr_of(step)
                    images, labels = images.to(dev, non_blocking=True), torch.as_tensor(labels).to(dev)
                    with autocast(precision, dev):
                        clf = fixed if ids is None else tuned.text.classifier(model, tokenizer, classnames, ids=ids)
                        logits = model.logit_scale.exp() * F.normalize(model.encode_image(images), dim=-1) @ clf
                    loss = F.cross_entropy(logits.float(), labels)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if step == 0:
                        check_only_tokens_have_grads(model, tuned)
                    scaler.step(opt)
                    scaler.update()
                    losses.append(loss.item())
                    if live is not None:
                        live.step = step
                        live.log_metric("tune/loss", loss.item())
                        live.log_metric("tune/lr", opt.param_groups[0]["lr"])
                        live.log_metric("tune/acc", (logits.argmax(dim=1) == labels).float().mean().item())
                    step += 1
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", refresh=False)
                tuned.history.append(sum(losses) / len(losses))
                if live is not None:
                    live.sync()
            bar.close()
        finally:
            V.unpatch(model)
            opt.zero_grad(set_to_none=True)
    if live is not None:
        live.summary["final_loss"] = tuned.history[-1]
        live.end()
    return tuned
