"""predictor: learn the Golden Ranking from the pruned model's own layer-L tokens (Phase II); test-split fidelity.

The tokens are cached on disk while it trains, in unnamed files under TMPDIR (ViT-B/16 at block 3: 0.6 MB per image
at fp32, half under half precision), so host RAM stays flat however many images were ranked."""
import click
import torch

from clipprune import config
from clipprune.data import load_dataset
from clipprune.dist import device
from clipprune.errors import ClipPruneError
from clipprune.experiment import predictor_path
from clipprune.golden import load_ranking
from clipprune.io import check_writable, write_json_atomic
from clipprune.pipeline import (MODELS, REPORTS, dataset_fingerprint, dataset_root, load_clip, ranking_groups,
                                ranking_path)
from clipprune.predictor import save_predictor, train_predictor
from clipprune.runner import params_opt, run
from clipprune.vit import num_patches


@click.command()
@params_opt
def main(params_path: str) -> None:
    """One predictor per ranking group (one for all synthetic tasks with a label-free score), trained on the
    train-split golden rankings; top-k overlap and Kendall tau on the test split are DVC metrics."""
    data, model_p, prune_p, golden, pred, compute = config.load("data", "model", "prune", "golden", "predictor",
                                                                "compute", path=params_path)
    check_writable(MODELS / "predictors", REPORTS, "dvclive/predictor")
    dev = device()
    model, preprocess, _ = load_clip(model_p, device=dev)
    report = {}
    for key, name in ranking_groups(data, golden).items():
        n = num_patches(model.visual)  # a ranking of another grid would train on the wrong patches
        train_rank, test_rank = (load_ranking(ranking_path(key, s), n_patches=n) for s in ("train", "test"))
        root = dataset_root(data, name)
        train = load_dataset(name, root=root, split="train", transform=preprocess).indexable()
        test = load_dataset(name, root=root, split="test", transform=preprocess).indexable()
        # The rankings' images: the train ones the golden stage chose (its meta lists a stratified sample; else
        # the first golden.n_train), the first data.n_test test ones. Checked: a ranking must never be paired
        # with other images than it ranked (a silently misaligned target still trains, on noise).
        train = torch.utils.data.Subset(train, train_rank.meta.get("indices", range(len(train_rank.labels))))
        test = torch.utils.data.Subset(test, range(min(len(test), len(test_rank.labels))))
        for split, subset, r in (("train", train, train_rank), ("test", test, test_rank)):
            if "fingerprint" in r.meta and dataset_fingerprint(name, split, subset) != r.meta["fingerprint"]:
                raise ClipPruneError(f"{ranking_path(key, split)} ranks other {split} images than {name} has now; "
                                     f"rerun the golden stage (dvc repro golden)")
        predictor, history = train_predictor(
            model=model, dataset=train, ranking=train_rank, layer=prune_p.layer, keep=prune_p.keep, loss=pred.loss,
            epochs=pred.epochs, lr=pred.lr, weight_decay=pred.weight_decay, batch_size=pred.batch_size, d=pred.d,
            seed=pred.seed, log_dir=f"dvclive/predictor/{key}", test_dataset=test, test_ranking=test_rank, device=dev,
            precision=compute.precision, workers=compute.workers)
        # The precision the tokens were computed at, only when not fp32: fp32 predictor files keep their bytes.
        extra = {"precision": predictor.config["precision"]} if "precision" in predictor.config else {}
        save_predictor(predictor_path(key), predictor, {"key": key, "dataset": name, "layer": prune_p.layer,
                                                        "keep": prune_p.keep, "loss": pred.loss, **extra})
        final = history["test"][-1]
        report[key] = {"topk_overlap": round(final["topk_overlap"], 6), "kendall_tau": round(final["kendall_tau"], 6),
                       "gmacs": round(predictor.macs() / 1e9, 8)}
        click.echo(f"predictor[{key}]: test top-k overlap {final['topk_overlap']:.4f}, Kendall tau {final['kendall_tau']:.4f}")
    write_json_atomic(REPORTS / "predictor.json", report)


if __name__ == "__main__":
    run(main)
