"""golden: Golden Ranking of the train and test images (Phase I); sharded by `python -m stages.launch golden`
(or torchrun -m stages.golden)."""
import click
import torch

from clipprune import config
from clipprune.data import load_dataset
from clipprune.dist import device, init_from_env, shutdown
from clipprune.golden import NEEDS_CLASSIFIER, SearchConfig, load_ranking, run_search
from clipprune.io import check_writable, write_json_atomic
from clipprune.pipeline import (CLIP_CKPT, RANKINGS, REPORTS, dataset_fingerprint, dataset_root, file_digest, load_clip,
                                ranked_indices, ranking_groups, ranking_path)
from clipprune.runner import params_opt, run
from clipprune.synth import TASKS
from clipprune.zeroshot import classifier_weights


def summary(path) -> dict:
    """How much of the score survives as the search eliminates 25/50/75% of the units (mean over images)."""
    r = load_ranking(path)
    n = r.unit_scores.shape[1]
    return {"n_images": len(r.labels), **{f"score_at_{q}pct": round(float(r.unit_scores[:, min(n - 1, n * q // 100)].mean()), 6)
                                         for q in (25, 50, 75)}}


@click.command()
@params_opt
@click.option("--progress/--no-progress", default=True, help="tqdm progress bars.")
def main(params_path: str, progress: bool) -> None:
    """Rank every patch of golden.n_train train images (the first, or a class-stratified sample: golden.train_sample)
    and of the first data.n_test test images (those evaluated).

    Resumable: shards land in rankings/<key>-<split>.pt.shards/ and a rerun skips the finished ones.
    """
    data, model, prune, golden, compute = config.load("data", "model", "prune", "golden", "compute", path=params_path)
    check_writable(RANKINGS, REPORTS)
    rank, _ = init_from_env()
    dev = device()
    clip, preprocess, tokenizer = load_clip(model, device=dev)
    cfg = SearchConfig(layer=prune.layer, unit=golden.unit, per_round=golden.per_round, budget=golden.budget,
                       score=golden.score, chunk_tokens=golden.chunk_tokens)
    cfg.check(clip.visual)  # unit vs grid, layer vs depth: refused before any data is read
    report = {}
    for key, name in ranking_groups(data, golden).items():
        # golden.joint (a classifier-reading score with one "synth" group): every task of the world at once
        tasks = [d for d in data.datasets if d.startswith("synth/")] if key == "synth" else []
        classifier = None  # built once per group: its train and test splits share the classes
        for split in ("train", "test"):
            ds = load_dataset(name, root=dataset_root(data, name), split=split, transform=preprocess)
            dataset = ds.indexable()
            cap = golden.n_train if split == "train" else data.n_test  # test: exactly the images evaluated
            indices = ranked_indices(dataset, cap, sample=golden.train_sample if split == "train" else "first",
                                     seed=data.seed)
            if indices is not None:
                dataset = torch.utils.data.Subset(dataset, indices)
            meta = {"model": model.arch, "model_digest": file_digest(CLIP_CKPT), "dataset": name, "split": split,
                    "fingerprint": dataset_fingerprint(name, split, dataset)}
            if indices is not None and golden.train_sample == "stratified" and split == "train":
                meta["indices"] = indices  # which train images row i ranks: the predictor stage reads them
            if golden.score in NEEDS_CLASSIFIER and tasks:
                meta["tasks"] = tasks
            if golden.score in NEEDS_CLASSIFIER and classifier is None:
                specs = [TASKS[t.removeprefix("synth/")] for t in tasks] or [{"classnames": ds.classnames,
                                                                            "templates": ds.templates}]
                heads = [classifier_weights(clip, tokenizer, c["classnames"], c["templates"], device=dev) for c in specs]
                classifier = heads if tasks else heads[0]
            out = ranking_path(key, split)
            run_search(model=clip, dataset=dataset, cfg=cfg, out_path=out, meta=meta, classifier=classifier,
                       batch_size=golden.batch_size, shard_size=golden.shard_size, device=dev,
                       progress=progress and rank == 0, precision=compute.precision, workers=compute.workers)
            if rank == 0:
                report[f"{key}-{split}"] = summary(out)
    if rank == 0:
        write_json_atomic(REPORTS / "golden.json", report)
    shutdown()


if __name__ == "__main__":
    run(main)
