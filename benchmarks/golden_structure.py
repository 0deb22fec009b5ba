"""What the default profile's Golden Rankings keep, and how far a predictor could follow them.

    python benchmarks/golden_structure.py --images 500 --stability-images 100 --json

Reads the default pipeline's outputs (params.yaml, models/clip.pt, rankings/, models/predictors/, data/synth) and
reports, per synthetic task, at prune.keep:
  - how often the golden and the predictor keep sets contain the patches the object touches vs the background;
  - how much two tasks' golden keep sets agree on the same images (chance = keep);
  - stability: the search rerun on slightly perturbed pixels (+ N(0, sigma) on the normalised input), top-k
    overlap with the original ranking (1.0 = the ranking is a deterministic, smooth function of the image);
  - zero-shot top-1 of hand-made selections at the same token count, through the real pruned forward path:
    random, stratified (object and background each kept at the keep rate), a fixed spatial lattice, object first.
These are the measurements behind the notes on issue #5: read them as properties of this small CLIP on this world.
"""
from __future__ import annotations

import json

import click
import numpy as np
import torch

from clipprune import config, synth
from clipprune import vit as V
from clipprune.golden import NEEDS_CLASSIFIER, GoldenSearch, SearchConfig, load_ranking
from clipprune.methods import build_method, encode_pruned
from clipprune.pipeline import dataset_root, group_of, load_clip, ranking_path
from clipprune.predictor import layer_tokens, load_predictor, predict_scores
from clipprune.experiment import predictor_path
from clipprune.data import dataset_labels, load_dataset
from clipprune.zeroshot import classifier_weights


def keep_mask(order: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N] bool: the last k entries of each elimination order (the kept patches)."""
    mask = torch.zeros(order.shape, dtype=torch.bool)
    return mask.scatter_(1, order[:, order.shape[1] - k :].long(), True)


def order_keeping(mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """An elimination order whose kept tail is exactly `mask` (ties in random order)."""
    noise = torch.rand(mask.shape, generator=gen)
    return (mask.float() + noise * 0.5).argsort(dim=1)


def selections(obj: torch.Tensor, k: int, seed: int) -> dict[str, torch.Tensor]:
    """Hand-made keep masks [B, N] of exactly k patches each."""
    gen = torch.Generator().manual_seed(seed)
    b, n = obj.shape
    rand = torch.rand(b, n, generator=gen)
    out = {"random": keep_mask(rand.argsort(dim=1), k)}
    # stratified: round(k/n) of the object's patches, the rest from the background, both at random
    n_obj = obj.sum(dim=1)
    k_obj = torch.minimum((n_obj.float() * k / n).round().long(), n_obj)
    prio = torch.where(obj, rand, rand + 2.0)  # object patches first in ascending order of priority
    strat = torch.zeros_like(obj)
    for i in range(b):
        ranked = prio[i].argsort()
        objs, bgs = ranked[: n_obj[i]], ranked[n_obj[i] :]
        strat[i, objs[: k_obj[i]]] = True
        strat[i, bgs[: k - int(k_obj[i])]] = True
    out["stratified"] = strat
    lattice = torch.zeros(n, dtype=torch.bool)
    lattice[torch.linspace(0, n - 1, k).round().long()] = True
    out["lattice"] = lattice.expand(b, n).clone()
    out["object_first"] = keep_mask(torch.where(obj, rand + 2.0, rand).argsort(dim=1), k)
    return out


def accuracy(model, x, y, classifier, mask, *, keep: float, layer: int, seed: int) -> float:
    emb = encode_pruned(model, build_method("ranking"), x, keep=keep, layer=layer,
                        ranking=order_keeping(mask, torch.Generator().manual_seed(seed)))
    return float(((emb @ classifier).argmax(dim=1) == y).float().mean())


def rates(mask: torch.Tensor, obj: torch.Tensor) -> dict[str, float]:
    return {"object_kept": round(float((mask & obj).sum() / obj.sum()), 4),
            "background_kept": round(float((mask & ~obj).sum() / (~obj).sum()), 4)}


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--images", default=500, show_default=True, help="Test images measured (the first ones).")
@click.option("--stability-images", default=100, show_default=True, help="Images searched again on perturbed pixels (0: skip).")
@click.option("--sigma", default=0.01, show_default=True, help="Std of the perturbation of the normalised input.")
@click.option("--json", "as_json", is_flag=True)
def main(params_path, images, stability_images, sigma, as_json):
    data, model_p, prune_p, golden = config.load("data", "model", "prune", "golden", path=params_path)
    tasks = [d.split("/", 1)[1] for d in data.datasets if d.startswith("synth/")]
    if not tasks:
        raise click.UsageError("this analysis needs the default profile's synth/ datasets (object masks)")
    torch.manual_seed(0)
    model, preprocess, tokenizer = load_clip(model_p)
    model.eval()
    root = dataset_root(data, data.datasets[0])
    fg = synth.load_split(root, "test", ("fg_mask",))["fg_mask"][:images]
    n_img, size = fg.shape[0], fg.shape[1]
    gh, gw = model.visual.grid_size
    ph = size // gh
    obj = torch.from_numpy(fg.reshape(n_img, gh, ph, gw, ph).any(axis=(2, 4)).reshape(n_img, gh * gw))
    n = gh * gw
    k = V.keep_count(prune_p.keep, n)
    ds = load_dataset(data.datasets[0], root=root, split="test", transform=preprocess).indexable()
    x = torch.stack([ds[i][0] for i in range(n_img)])
    tokens = layer_tokens(model, torch.utils.data.Subset(ds, range(n_img)), layer=prune_p.layer)
    hand = selections(obj, k, seed=0)
    report: dict = {"keep": prune_p.keep, "kept_patches": k, "images": n_img, "chance_overlap": round(k / n, 4),
                    "object_patch_share": round(float(obj.float().mean()), 4), "tasks": {}}
    golden_masks, stability = {}, {}
    world = {t: classifier_weights(model, tokenizer, synth.TASKS[t]["classnames"], synth.TASKS[t]["templates"])
             for t in tasks}  # a joint ranking's search reads every task's classifier
    for task in tasks:
        name = f"synth/{task}"
        key = group_of(data, golden, name)
        ranking = load_ranking(ranking_path(key, "test"))
        gmask = keep_mask(ranking.patch_order[:n_img], k)
        golden_masks[task] = gmask
        scores = predict_scores(load_predictor(predictor_path(key)), tokens)
        pmask = keep_mask(scores.argsort(dim=1, stable=True), k)
        tds = load_dataset(name, root=root, split="test", transform=preprocess)
        y = torch.tensor(dataset_labels(tds.indexable())[:n_img])
        clf = world[task]
        row = {"golden": rates(gmask, obj), "predictor": {**rates(pmask, obj),
               "topk_overlap": round(float((pmask & gmask).sum(dim=1).float().mean() / k), 4)}}
        acc = {label: accuracy(model, x, y, clf, m, keep=prune_p.keep, layer=prune_p.layer, seed=1)
               for label, m in {**hand, "golden": gmask, "predictor": pmask}.items()}
        row["acc1"] = {label: round(v, 4) for label, v in acc.items()}
        if stability_images and key not in stability:  # a ranking shared by the tasks (one group) is searched once
            m = min(stability_images, n_img)
            cfg = SearchConfig(layer=prune_p.layer, unit=golden.unit, per_round=golden.per_round, budget=golden.budget,
                               score=golden.score, chunk_tokens=golden.chunk_tokens)
            joint = key == "synth" and golden.score in NEEDS_CLASSIFIER
            search = GoldenSearch(model, cfg, classifier=list(world.values()) if joint else clf)
            noisy = x[:m] + sigma * torch.randn(x[:m].shape, generator=torch.Generator().manual_seed(2))
            again = torch.cat([search.search(noisy[s : s + 32], y[:m][s : s + 32]).patch_order for s in range(0, m, 32)])
            stability[key] = round(float((keep_mask(again, k) & gmask[:m]).sum(dim=1).float().mean() / k), 4)
        if stability_images:
            row["stability_topk_overlap"] = stability[key]
        report["tasks"][task] = row
    pairs = [(a, b) for i, a in enumerate(tasks) for b in tasks[i + 1 :]]
    if pairs:
        agree = [float((golden_masks[a] & golden_masks[b]).sum(dim=1).float().mean() / k) for a, b in pairs]
        report["cross_task_golden_overlap"] = round(float(np.mean(agree)), 4)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"keep {prune_p.keep} ({k}/{n} patches), {n_img} test images, object on {report['object_patch_share']:.1%} "
               f"of patches; chance overlap {k / n:.3f}; golden keep sets of two tasks agree {report.get('cross_task_golden_overlap')}")
    for task, row in report["tasks"].items():
        click.echo(f"{task:>9}: golden keeps object {row['golden']['object_kept']:.2f} / background {row['golden']['background_kept']:.2f}; "
                   f"predictor {row['predictor']['object_kept']:.2f} / {row['predictor']['background_kept']:.2f}, "
                   f"overlap {row['predictor']['topk_overlap']:.3f}; stability {row.get('stability_topk_overlap')}")
        click.echo("           acc1 " + "  ".join(f"{label} {v:.3f}" for label, v in row["acc1"].items()))


if __name__ == "__main__":
    main()
