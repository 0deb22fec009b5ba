"""pretrain: train a small CLIP on the synthetic world or a labelled dataset (or fetch the paper profile's weights)."""
import click

from clipprune import config
from clipprune.io import check_writable, write_json_atomic
from clipprune.pipeline import CLIP_CKPT, REPORTS, dataset_root
from clipprune.runner import params_opt, run


@click.command()
@params_opt
def main(params_path: str) -> None:
    """Write models/clip.pt: trained contrastively here when model.pretrained is null, else loaded from the tag/path.

    Trained on the synthetic world at data.root when data.datasets[0] is a synth/ task; otherwise on
    data.datasets[0]'s train split (its first data.n_train images, captioned from its zero-shot templates),
    with zero-shot on the first data.n_test test images.
    """
    data, model, pre = config.load("data", "model", "pretrain", path=params_path)
    check_writable(CLIP_CKPT.parent, REPORTS, "dvclive/pretrain")
    if model.pretrained is not None:
        from clipprune.model import build_model, save_checkpoint

        clip, _, _ = build_model(model.arch, pretrained=model.pretrained)
        save_checkpoint(clip, CLIP_CKPT, arch=model.arch)
        write_json_atomic(REPORTS / "pretrain.json", {"pretrained": model.pretrained})
        return
    from clipprune.pretrain import pretrain

    name = data.datasets[0] if data.datasets else "synth/"
    if name.startswith("synth/"):
        source = {"world_root": data.root}
    else:
        source = {"dataset": name, "data_root": dataset_root(data, name), "n_train": data.n_train,
                  "n_test": data.n_test}
        if len(data.datasets) > 1:
            click.echo(f"pretrain: training on {name} only (the first of data.datasets)")
    result = pretrain(**source, out_path=CLIP_CKPT, arch=model.arch, steps=pre.steps,
                      batch_size=pre.batch_size, lr=pre.lr, weight_decay=pre.weight_decay, warmup=pre.warmup,
                      text_freeze_frac=pre.text_freeze_frac, seed=pre.seed, threads=pre.threads,
                      log_dir="dvclive/pretrain")
    seconds = result.pop("train_seconds", None)
    click.echo(f"pretrain: {seconds:.0f} s; zero-shot top-1 " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    # Wall-clock time stays out of the metrics file: two runs must write identical metrics.
    write_json_atomic(REPORTS / "pretrain.json", {"zeroshot_top1": result})


if __name__ == "__main__":
    run(main)
