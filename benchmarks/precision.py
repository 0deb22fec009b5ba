"""What half precision changes: every evaluated row's zero-shot top-1, and the golden search's keep sets.

    python benchmarks/precision.py --precision bf16 --golden-images 200 [--json]

Reads a pipeline's outputs (params.yaml, models/clip.pt, rankings/, models/predictors/, models/tokens/, data) and
evaluates every row of eval.methods on every dataset twice, in fp32 and at --precision (clipprune.precision's
autocast), on the same images; then reruns the golden search on the first --golden-images test images of each
ranking group in both precisions and reports the mean overlap of their keep sets at prune.keep (1.0: identical).
Also the wall time of each pass, side by side in this one run (on a CPU without native bf16 it is slower).
"""
from __future__ import annotations

import json
import time

import click
import torch

from clipprune import config
from clipprune.config import ComputeParams
from clipprune.experiment import evaluate_dataset, setups_for
from clipprune.golden import NEEDS_CLASSIFIER, GoldenSearch, SearchConfig
from clipprune.methods import ranking_scores
from clipprune.pipeline import dataset_root, load_clip, ranking_groups
from clipprune.precision import autocast
from clipprune.predictor import topk_overlap
from clipprune.synth import TASKS
from clipprune.zeroshot import classifier_weights


def accuracy_deltas(params_path: str, precision: str, *, device: str = "cpu") -> dict:
    """{dataset: {row: (acc1 fp32, acc1 at precision)}} and the seconds each pass took."""
    data, model_p, prune_p, golden, eval_p = config.load("data", "model", "prune", "golden", "eval", path=params_path)
    clip = load_clip(model_p, device=device)
    from clipprune import vit as V

    dims = V.ViTDims.of(clip[0].visual)
    out, seconds = {}, {"fp32": 0.0, precision: 0.0}
    for dataset in data.datasets:
        runs = {}
        for p in ("fp32", precision):
            setups = setups_for(dataset, data=data, golden=golden, prune=prune_p, dims=dims, labels=tuple(eval_p.methods))
            t0 = time.perf_counter()
            runs[p] = evaluate_dataset(setups, dataset=dataset, data=data, model_params=model_p, eval_params=eval_p,
                                       compute=ComputeParams(precision=p), device=device, clip=clip)
            seconds[p] += time.perf_counter() - t0
        out[dataset] = {row: (runs["fp32"][row].metrics["acc1"], runs[precision][row].metrics["acc1"])
                        for row in eval_p.methods}
    return {"acc1": out, "seconds": {k: round(v, 2) for k, v in seconds.items()}}


def golden_overlap(params_path: str, precision: str, *, images: int, device: str = "cpu") -> dict:
    """Mean overlap of the keep sets at prune.keep of the golden search in fp32 and at `precision`, per group."""
    from clipprune.data import load_dataset

    data, model_p, prune_p, golden = config.load("data", "model", "prune", "golden", path=params_path)
    model, preprocess, tokenizer = load_clip(model_p, device=device)
    cfg = SearchConfig(layer=prune_p.layer, unit=golden.unit, per_round=golden.per_round, budget=golden.budget,
                       score=golden.score, chunk_tokens=golden.chunk_tokens)
    out = {}
    for key, name in ranking_groups(data, golden).items():
        ds = load_dataset(name, root=dataset_root(data, name), split="test", transform=preprocess)
        test = ds.indexable()
        tasks = [d for d in data.datasets if d.startswith("synth/")] if key == "synth" else []
        classifier = None
        if golden.score in NEEDS_CLASSIFIER:
            specs = [TASKS[t.removeprefix("synth/")] for t in tasks] or [{"classnames": ds.classnames,
                                                                        "templates": ds.templates}]
            heads = [classifier_weights(model, tokenizer, c["classnames"], c["templates"], device=device) for c in specs]
            classifier = heads if tasks else heads[0]
        search = GoldenSearch(model, cfg, classifier=classifier)
        n = min(images, len(test))
        orders, seconds = {}, {}
        for p in ("fp32", precision):
            chunks, t0 = [], time.perf_counter()
            for s in range(0, n, golden.batch_size):
                batch = [test[i] for i in range(s, min(n, s + golden.batch_size))]
                x = torch.stack([b[0] for b in batch]).to(device)
                y = torch.tensor([int(b[1]) for b in batch], device=device)
                with autocast(p, device):
                    chunks.append(search.search(x, y).patch_order.cpu())
            orders[p], seconds[p] = torch.cat(chunks), round(time.perf_counter() - t0, 2)
        # The keep set at prune.keep of the half-precision order, against the fp32 one (as predictor fidelity is).
        overlap = topk_overlap(ranking_scores(orders[precision]), orders["fp32"].long(), keep=prune_p.keep)
        out[key] = {"images": n, "keep": prune_p.keep, "topset_overlap": round(overlap.mean().item(), 4),
                    "min_overlap": round(overlap.min().item(), 4), "identical_orders": int((orders["fp32"] ==
                    orders[precision]).all(1).sum()), "seconds": seconds}
    return out


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--precision", default="bf16", show_default=True, type=click.Choice(["tf32", "bf16", "fp16"]),
              help="compared with fp32")
@click.option("--golden-images", default=200, show_default=True, help="test images the golden search reruns on")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of tables")
def main(params_path: str, precision: str, golden_images: int, device: str, as_json: bool) -> None:
    """fp32 vs --precision on this pipeline's outputs: each row's top-1, the golden keep sets."""
    acc = accuracy_deltas(params_path, precision, device=device)
    gold = golden_overlap(params_path, precision, images=golden_images, device=device)
    if as_json:
        click.echo(json.dumps({"precision": precision, **acc, "golden": gold}))
        return
    click.echo(f"top-1, fp32 -> {precision} (points)    eval seconds {acc['seconds']}")
    worst = 0.0
    for dataset, rows in acc["acc1"].items():
        for row, (a, b) in rows.items():
            worst = max(worst, abs(b - a))
            click.echo(f"  {dataset:>16} {row:>18}: {100 * a:6.2f} -> {100 * b:6.2f} ({100 * (b - a):+.2f})")
    click.echo(f"largest |change|: {100 * worst:.2f} points")
    for key, g in gold.items():
        click.echo(f"golden[{key}]: keep-set overlap {g['topset_overlap']} (min {g['min_overlap']}), "
                   f"identical orders {g['identical_orders']}/{g['images']}, seconds {g['seconds']}")


if __name__ == "__main__":
    main()
