"""Contrastive pretraining of the default profile's small CLIP on the synthetic world (CPU, minutes).

Two things make this work at this scale (see the calibration notes in the README / issue):
- the text tower's learning rate is held at zero for the first `text_freeze_frac` of the steps: trained jointly
  from scratch, the two towers co-adapt on the easy attributes (colour, size) and shape/position stay at chance;
  against a fixed random text encoder the image tower must separate every attribute the captions name;
- a fixed number of small-batch steps with a fixed data order, so a run is a pure function of its seed.
"""

import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from tqdm import tqdm

from clipprune import synth
from clipprune.model import build_model, images_to_input, save_checkpoint


def _tokenize(tokenizer, captions: np.ndarray) -> torch.Tensor:
    # Captions repeat a lot (a few thousand distinct strings), and the BPE tokenizer is pure Python.
    uniq, inverse = np.unique(captions, return_inverse=True)
    return tokenizer([str(c) for c in uniq])[torch.from_numpy(inverse.reshape(-1))]


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images: np.ndarray, labels: dict[str, np.ndarray],
                       *, batch_size: int = 500) -> dict[str, float]:
    """Top-1 zero-shot accuracy per synthetic task, plus their mean under "mean"."""
    was_training = model.training
    model.eval()
    feats = torch.cat([model.encode_image(images_to_input(images[i:i + batch_size], model), normalize=True)
                       for i in range(0, len(images), batch_size)])
    acc = {}
    for task, spec in synth.TASKS.items():
        templates = [lambda c, t=t: t.format(c=c) for t in spec["templates"]]  # "{c}" as in clip_benchmark
        w = open_clip.build_zero_shot_classifier(model, tokenizer, classnames=spec["classnames"],
                                                 templates=templates, num_classes_per_batch=None)
        pred = (feats @ w).argmax(dim=1).numpy()
        acc[task] = float((pred == labels[task]).mean())
    acc["mean"] = float(np.mean([acc[t] for t in synth.TASKS]))
    model.train(was_training)
    return acc


def _lr_factor(step: int, *, start: int, warmup: int, total: int) -> float:
    """Linear warmup from `start`, then cosine to zero at `total`; zero before `start`."""
    if step < start:
        return 0.0
    if step < start + warmup:
        return (step - start + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - start - warmup) / max(1, total - start - warmup)))


def pretrain(*, world_root: str | Path, out_path: str | Path, arch: str = "clipprune-tiny", steps: int = 3500,
             batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 0.1, warmup: int = 100,
             text_freeze_frac: float = 0.5, seed: int = 0, threads: int = 2, log_dir: str | None = None,
             eval_every: int = 500) -> dict:
    """Train `arch` from scratch on world_root/train.npz; save {"arch", "state_dict"} to out_path.

    Returns the final zero-shot top-1 per task on the test split, its "mean", and "train_seconds".
    """
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model, _, tokenizer = build_model(arch)
    model.train()

    train = synth.load_split(world_root, "train", ("images", "captions"))
    test = synth.load_split(world_root, "test", ("images", *synth.TASKS))
    images = torch.from_numpy(train["images"])  # uint8; normalised per batch to keep memory at 1 byte/pixel
    texts = _tokenize(tokenizer, train["captions"])

    # AdamW groups: vision (+ logit_scale) vs text, decay vs no decay (open_clip's rule: no decay on gains/biases).
    groups = {}
    for name, p in model.named_parameters():
        tower = "vision" if name.startswith("visual.") or name == "logit_scale" else "text"
        decay = not (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name)
        groups.setdefault((tower, decay), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "tower": t, "weight_decay": weight_decay if d else 0.0}
                             for (t, d), ps in groups.items()], lr=lr, betas=(0.9, 0.98), eps=1e-6,
                            fused=True)  # fused: ~15% faster steps on CPU, mostly the 3M-entry token embedding
    text_params = [p for (t, _), ps in groups.items() if t == "text" for p in ps]
    freeze_steps = int(round(text_freeze_frac * steps))
    loss_fn = ClipLoss()

    live = None
    if log_dir is not None:
        from dvclive import Live
        # dvcyaml=False: the pipeline's dvc.yaml declares our outputs; dvclive must not rewrite it.
        live = Live(dir=str(log_dir), dvcyaml=False, save_dvc_exp=False)

    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(images), generator=gen), 0
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain", mininterval=5.0)
    for step in bar:
        # Text params get no grad while frozen: identical to lr 0 for AdamW, and skips the text backward pass.
        frozen = step < freeze_steps
        for p in text_params:
            p.requires_grad_(not frozen)
        for g in opt.param_groups:
            start = freeze_steps if g["tower"] == "text" else 0
            g["lr"] = lr * _lr_factor(step, start=start, warmup=warmup, total=steps)

        if pos + batch_size > len(order):  # new epoch, new permutation; drop the ragged tail
            order, pos = torch.randperm(len(images), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size

        img_f, txt_f, scale = model(images_to_input(images[idx], model), texts[idx])
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip does: an unbounded temperature diverges

        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if live is not None and (step % 25 == 0 or (eval_every and (step + 1) % eval_every == 0)):
            live.step = step
            live.log_metric("train/loss", loss.item())
            for tower, tower_lr in {g["tower"]: g["lr"] for g in opt.param_groups}.items():
                live.log_metric(f"train/lr_{tower}", tower_lr)
            if eval_every and (step + 1) % eval_every == 0 and step != steps - 1:
                for task, a in zero_shot_accuracy(model, tokenizer, test["images"], test).items():
                    live.log_metric(f"zeroshot/{task}", a)
            live.sync()
    train_seconds = time.perf_counter() - t0

    model.eval()
    acc = zero_shot_accuracy(model, tokenizer, test["images"], test)
    if live is not None:
        live.step = steps
        for task, a in acc.items():
            live.log_metric(f"zeroshot/{task}", a)
        live.summary["train_seconds"] = train_seconds
        live.end()
    save_checkpoint(model, out_path, arch=arch)
    return {**acc, "train_seconds": train_seconds}
