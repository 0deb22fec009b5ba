"""tune: learn visual tokens and text context few-shot on the predictor-pruned CLIP (Phase III), and, as the
unpruned reference of the same tuning, on the full CLIP; only the learned tensors are saved."""
import click

from clipprune import config
from clipprune.data import load_dataset
from clipprune.dist import device
from clipprune.experiment import predictor_path, tokens_path
from clipprune.io import check_writable, write_json_atomic
from clipprune.methods import build_method
from clipprune.pipeline import MODELS, REPORTS, dataset_root, group_of, load_clip, safe_name
from clipprune.prompts import train_transform, tune
from clipprune.runner import params_opt, run


@click.command()
@params_opt
def main(params_path: str) -> None:
    """For each dataset: tokens for predictor pruning at (prune.keep, prune.layer), and for the full model."""
    data, model_p, prune_p, golden, tune_p, compute = config.load("data", "model", "prune", "golden", "tune", "compute",
                                                                  path=params_path)
    check_writable(MODELS / "tokens", REPORTS, "dvclive/tune")
    visual = {"n": tune_p.visual_tokens, "deep": tune_p.deep} if tune_p.visual_tokens else None
    text = {"n_ctx": None if tune_p.text_init else tune_p.text_ctx, "init": tune_p.text_init} if tune_p.text_ctx else None
    report = {}
    model, preprocess, tokenizer = load_clip(model_p, device=device())  # once: tune leaves it as it found it
    for dataset in data.datasets:
        # tune.augment applies to these training images only; evaluation loads its own with `preprocess`.
        ds = load_dataset(dataset, root=dataset_root(data, dataset), split="train",
                          transform=train_transform(tune_p.augment, preprocess=preprocess))
        train_set = ds.indexable()  # a stream (wds/) is decoded here, once for both tunings
        predictor = build_method("predictor", path=str(predictor_path(group_of(data, golden, dataset))))
        for pruned, method, keep in ((True, predictor, prune_p.keep), (False, build_method("full"), 1.0)):
            tuned = tune(model=model, tokenizer=tokenizer, train_set=train_set, classnames=ds.classnames,
                         templates=ds.templates, method=method, keep=keep, layer=prune_p.layer, visual=visual, text=text,
                         shots=tune_p.shots, epochs=tune_p.epochs, lr=tune_p.lr, batch_size=tune_p.batch_size,
                         seed=tune_p.seed, weight_decay=tune_p.weight_decay, warmup_epochs=tune_p.warmup_epochs,
                         warmup_lr=tune_p.warmup_lr, schedule=tune_p.schedule, fewshot=tune_p.fewshot, device=device(),
                         precision=compute.precision, workers=compute.workers, augmented=tune_p.augment != "none",
                         log_dir=f"dvclive/tune/{safe_name(dataset)}-{'pruned' if pruned else 'full'}")
            tuned.config["augment"] = tune_p.augment
            tuned.save(tokens_path(dataset, pruned=pruned))
            report[f"{dataset}/{'pruned' if pruned else 'full'}"] = {
                "first_epoch_loss": round(tuned.history[0], 6), "last_epoch_loss": round(tuned.history[-1], 6)}
    write_json_atomic(REPORTS / "tune.json", report)


if __name__ == "__main__":
    run(main)
