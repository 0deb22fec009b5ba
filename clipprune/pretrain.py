"""Contrastive pretraining of a profile's small CLIP (CPU, minutes), on one of two data sources (`TrainData`):

- the synthetic world (the default profile): its generated image-caption pairs, zero-shot on its five tasks;
- a labelled dataset (e.g. wds/cifar10, the CIFAR-10 profile): each train image gets one of the dataset's own
  zero-shot templates (picked per image, seeded) filled with its class name as caption; zero-shot on the first
  n_test images of its test split with its classnames and templates.

Two things make this work at this scale (see the calibration notes in the README / issue):
- the text tower's learning rate is held at zero for the first `text_freeze_frac` of the steps: trained jointly
  from scratch, the two towers co-adapt on the easy attributes (colour, size) and shape/position stay at chance;
  against a fixed random text encoder the image tower must separate every attribute the captions name;
- a fixed number of small-batch steps with a fixed data order, so a run is a pure function of its seed.
"""

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from open_clip.loss import ClipLoss
from PIL import Image
from tqdm import tqdm

from clipprune import synth
from clipprune.errors import ClipPruneError
from clipprune.model import build_model, images_to_input, save_checkpoint
from clipprune.zeroshot import classifier_weights


@dataclass
class TrainData:
    """What pretraining reads: image-caption pairs to train on, labelled test images per zero-shot task."""
    images: np.ndarray  # uint8 [N, S, S, 3] at the model's input size
    captions: np.ndarray  # str [N], one caption per image
    test_images: np.ndarray  # uint8 [M, S, S, 3]
    test_labels: dict[str, np.ndarray]  # task -> class index per test image [M]
    tasks: dict[str, dict]  # task -> {"classnames": [...], "templates": ["... {c} ...", ...]}


def synth_train_data(world_root: str | Path) -> TrainData:
    """The synthetic world's train pairs and its test images labelled for every attribute task."""
    train = synth.load_split(world_root, "train", ("images", "captions"))
    test = synth.load_split(world_root, "test", ("images", *synth.TASKS))
    return TrainData(images=train["images"], captions=train["captions"], test_images=test["images"],
                     test_labels={t: test[t] for t in synth.TASKS}, tasks=synth.TASKS)


def template_captions(labels: Sequence[int], classnames: Sequence[str], templates: Sequence[str], *,
                      seed: int) -> np.ndarray:
    """One caption per image: a template drawn per image (a pure function of seed and position) with its
    class name put in for "{c}", as clip_benchmark fills the same templates for zero-shot."""
    if not templates:
        raise ClipPruneError("pretrain: the dataset has no zero-shot templates to build captions from")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classnames)):
        raise ClipPruneError(f"pretrain: labels span {labels.min()}..{labels.max()} but the dataset names "
                             f"{len(classnames)} classes; check its classnames.txt")
    pick = np.random.default_rng(seed).integers(0, len(templates), size=len(labels))
    return np.array([templates[t].format(c=classnames[y]) for t, y in zip(pick, labels)])


def square_pixels(size: int) -> Callable[[Image.Image], np.ndarray]:
    """PIL image -> uint8 [size, size, 3]: RGB, bicubic resize of the short side to `size`, centre crop.

    The same pixels open_clip's inference preprocess feeds a square-input model (its default "shortest" resize
    mode), so `images_to_input` of the result equals the pipeline's evaluation transform (tests check it).
    """
    def pixels(img: Image.Image) -> np.ndarray:
        img = img.convert("RGB")
        w, h = img.size
        if (w, h) != (size, size):
            # torchvision's Resize(size) rounding: the short side becomes exactly `size`
            nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
            img = img.resize((nw, nh), Image.BICUBIC)
            left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
            img = img.crop((left, top, left + size, top + size))
        return np.array(img, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)
    return pixels


def _decode(ld, *, pixels: Callable[[Image.Image], np.ndarray], limit: int | None,
            what: str) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` (all when None) samples of a LoadedDataset, in file order: (uint8 images, labels)."""
    from clipprune.data import DataError

    ds = ld.dataset
    samples = iter(ds) if ld.iterable else (ds[i] for i in range(len(ds)))
    images, labels = [], []
    for img, y in samples:
        if limit is not None and len(labels) >= limit:
            break
        images.append(pixels(img))
        labels.append(int(y))
    if not labels:
        raise DataError(f"{what}: no samples to read")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def dataset_train_data(name: str, *, root: str | Path, pixels: Callable[[Image.Image], np.ndarray],
                       n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> TrainData:
    """A labelled dataset (any `clipprune.data.load_dataset` name) as image-caption pairs.

    Train: the first n_train images of the train split, decoded once through `pixels`, each captioned by
    `template_captions`. Test: the first n_test images of the test split (those the pipeline evaluates),
    one zero-shot task named `name` with the dataset's classnames and templates.
    """
    from clipprune.data import load_dataset

    train = load_dataset(name, root=root, split="train")
    images, labels = _decode(train, pixels=pixels, limit=n_train, what=f"{root}: {name} train split")
    test = load_dataset(name, root=root, split="test")
    test_images, test_labels = _decode(test, pixels=pixels, limit=n_test, what=f"{root}: {name} test split")
    return TrainData(images=images, captions=template_captions(labels, train.classnames, train.templates, seed=seed),
                     test_images=test_images, test_labels={name: test_labels},
                     tasks={name: {"classnames": list(test.classnames), "templates": list(test.templates)}})


def _tokenize(tokenizer, captions: np.ndarray) -> torch.Tensor:
    # Captions repeat a lot (a few thousand distinct strings), and the BPE tokenizer is pure Python.
    uniq, inverse = np.unique(captions, return_inverse=True)
    return tokenizer([str(c) for c in uniq])[torch.from_numpy(inverse.reshape(-1))]


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images: np.ndarray, labels: dict[str, np.ndarray],
                       *, tasks: dict[str, dict] | None = None, batch_size: int = 500) -> dict[str, float]:
    """Top-1 zero-shot accuracy per task (default: the synthetic tasks), plus their mean under "mean"."""
    tasks = synth.TASKS if tasks is None else tasks
    was_training = model.training
    model.eval()
    feats = torch.cat([model.encode_image(images_to_input(images[i:i + batch_size], model), normalize=True)
                       for i in range(0, len(images), batch_size)])
    acc = {}
    for task, spec in tasks.items():
        w = classifier_weights(model, tokenizer, spec["classnames"], spec["templates"])  # as evaluation builds it
        pred = (feats @ w).argmax(dim=1).numpy()
        acc[task] = float((pred == labels[task]).mean())
    acc["mean"] = float(np.mean([acc[t] for t in tasks]))
    model.train(was_training)
    return acc


def _lr_factor(step: int, *, start: int, warmup: int, total: int) -> float:
    """Linear warmup from `start`, then cosine to zero at `total`; zero before `start`."""
    if step < start:
        return 0.0
    if step < start + warmup:
        return (step - start + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - start - warmup) / max(1, total - start - warmup)))


def pretrain(*, out_path: str | Path, world_root: str | Path | None = None, dataset: str | None = None,
             data_root: str | Path | None = None, n_train: int | None = None, n_test: int | None = None,
             arch: str = "clipprune-tiny", steps: int = 3500,
             batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 0.1, warmup: int = 100,
             text_freeze_frac: float = 0.5, seed: int = 0, threads: int = 2, log_dir: str | None = None,
             eval_every: int = 500) -> dict:
    """Train `arch` from scratch; save {"arch", "state_dict"} to out_path.

    Data: world_root (the synthetic world's train.npz / test.npz), or dataset + data_root (a labelled dataset,
    see `dataset_train_data`; n_train / n_test cap its splits, None: all). Give exactly one of the two.
    Returns the final zero-shot top-1 per task on the test split, its "mean", and "train_seconds".
    """
    if (world_root is None) == (dataset is None):
        raise ClipPruneError("pretrain: give either world_root (synthetic world) or dataset (+ data_root)")
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model, _, tokenizer = build_model(arch)
    model.train()

    if dataset is None:
        data = synth_train_data(world_root)
    else:
        size = model.visual.image_size
        h, w = (size, size) if isinstance(size, int) else size
        if h != w:
            raise ClipPruneError(f"pretrain: {arch} has a non-square input {size}; only square inputs are supported")
        data = dataset_train_data(dataset, root=data_root, pixels=square_pixels(h), n_train=n_train,
                                  n_test=n_test, seed=seed)
    images = torch.from_numpy(data.images)  # uint8; normalised per batch to keep memory at 1 byte/pixel
    texts = _tokenize(tokenizer, data.captions)

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
                for task, a in zero_shot_accuracy(model, tokenizer, data.test_images, data.test_labels, tasks=data.tasks).items():
                    live.log_metric(f"zeroshot/{task}", a)
            live.sync()
    train_seconds = time.perf_counter() - t0

    model.eval()
    acc = zero_shot_accuracy(model, tokenizer, data.test_images, data.test_labels, tasks=data.tasks)
    if live is not None:
        live.step = steps
        for task, a in acc.items():
            live.log_metric(f"zeroshot/{task}", a)
        live.summary["train_seconds"] = train_seconds
        live.end()
    save_checkpoint(model, out_path, arch=arch)
    return {**acc, "train_seconds": train_seconds}
