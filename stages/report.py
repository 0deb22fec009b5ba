"""report: aggregate the evaluations into reports/metrics.json, DVC plot data, seaborn figures and summary.md."""
import click
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from clipprune import config, report
from clipprune.experiment import eval_labels
from clipprune.io import check_writable, write_bytes_atomic, write_json_atomic
from clipprune.pipeline import REPORTS, read_report
from clipprune.runner import params_opt, run

# What dvc.yaml's report stage declares under params, and all that summary.md shows.
DECLARED = ("data", "model", "prune", "golden", "eval", "predictor.transfer_from")


def overlays(data, model_p, prune_p, golden, eval_p) -> None:
    """Which patches each method kept on a few test images of the first dataset (reports/figures/overlays.png)."""
    from clipprune.data import load_dataset
    from clipprune.experiment import setups_for
    from clipprune.golden import load_ranking
    from clipprune.methods import prune
    from clipprune import vit as V
    from clipprune.pipeline import dataset_root, load_clip

    name = data.datasets[0]
    model, preprocess, _ = load_clip(model_p)
    ds = load_dataset(name, root=dataset_root(data, name), split="test", transform=preprocess)
    x = next(iter(ds.loader(batch_size=eval_p.overlay_images)))[0]  # the first test images (streams have no len)
    n = len(x)
    cfg = getattr(model.visual, "preprocess_cfg", {})
    mean = torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN))[:, None, None]
    std = torch.tensor(cfg.get("std", OPENAI_DATASET_STD))[:, None, None]
    pixels = x * std + mean  # back to [0, 1] for display
    masks = {}
    rows = setups_for(name, data=data, golden=golden, prune=prune_p, dims=V.ViTDims.of(model.visual),
                      labels=tuple(m for m in ("random", "cls_attention", "golden", "predictor") if m in eval_p.methods))
    for label, s in rows.items():
        prune(model, s.method, keep=s.keep, layer=s.layer)
        if s.ranking is not None:
            s.method.bind(load_ranking(s.ranking, n_patches=V.num_patches(model.visual)).patch_order[:n])
        masks[label] = report.kept_patches(model, x, layer=s.layer, forward=model.encode_image)
        V.unpatch(model)
    report.overlay_figure(pixels, masks, model.visual.grid_size, REPORTS / "figures" / "overlays.png")


@click.command()
@params_opt
def main(params_path: str) -> None:
    """Write reports/metrics.json, reports/plots/*.csv, reports/figures/*.png and reports/summary.md."""
    data, model_p, prune_p, golden, eval_p, pred_p = config.load("data", "model", "prune", "golden", "eval", "predictor",
                                                                 path=params_path)
    check_writable(REPORTS / "plots", REPORTS / "figures", REPORTS)
    results = report.collect(REPORTS / "eval", data.datasets, list(eval_labels(eval_p, data, pred_p)))
    predictor = read_report("predictor.json", stage="predictor")
    metrics = report.build_metrics(results, predictor=predictor, resamples=eval_p.bootstrap, seed=data.seed)
    write_json_atomic(REPORTS / "metrics.json", metrics)
    sweep = read_report("sweep.json", stage="sweep")
    vs_keep = report.plot_rows(sweep)
    report.write_plot_data(REPORTS / "plots", metrics, vs_keep)
    report.figures(metrics, vs_keep, REPORTS / "figures")
    overlays(data, model_p, prune_p, golden, eval_p)
    flops = read_report("flops.json", stage="flops")
    # Only the sections this stage declares in dvc.yaml: a section it does not depend on (check) could change
    # without the report rerunning, and summary.md would then show a stale value.
    params = config.pick(config.load_params(params_path), DECLARED)
    write_bytes_atomic(REPORTS / "summary.md", report.summary_markdown(metrics, flops, params=params, predictor=predictor).encode())
    click.echo((REPORTS / "summary.md").read_text().split("## Predictor")[0])


if __name__ == "__main__":
    run(main)
