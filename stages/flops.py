"""flops: GFLOPs of every evaluated row at matched cost, by the formula and by fvcore (MACs convention)."""
import click

from clipprune import config
from clipprune import vit as V
from clipprune.experiment import eval_labels, setup_gflops, setups_for
from clipprune.flops import CONVENTION, fvcore_gflops
from clipprune.io import check_writable, write_json_atomic
from clipprune.methods import build_method, prune
from clipprune.pipeline import REPORTS, load_clip
from clipprune.runner import params_opt, run


def fvcore_of(setup, model) -> float:
    """fvcore's count for a row; the golden oracle's ops are random pruning's at the same keep (a gather)."""
    method = build_method("random") if setup.method.name == "ranking" else setup.method
    if setup.tokens is not None and setup.tokens.is_file():
        from clipprune.prompts import TunedTokens

        TunedTokens.load(setup.tokens).apply(model, method=method, keep=setup.keep, layer=setup.layer)
    else:
        prune(model, method, keep=setup.keep, layer=setup.layer)
    try:
        return fvcore_gflops(model)
    finally:
        V.unpatch(model)


@click.command()
@params_opt
def main(params_path: str) -> None:
    """Write reports/flops.json: per dataset and row, the setting, analytic and fvcore GFLOPs."""
    data, model_p, prune_p, golden, eval_p, pred_p = config.load("data", "model", "prune", "golden", "eval", "predictor",
                                                                 path=params_path)
    labels = eval_labels(eval_p, data, pred_p)
    check_writable(REPORTS)
    model, _, _ = load_clip(model_p)
    dims = V.ViTDims.of(model.visual)
    table = {"convention": CONVENTION, "datasets": {}}
    for dataset in data.datasets:
        rows = {}
        for label, s in setups_for(dataset, data=data, golden=golden, prune=prune_p, dims=dims, labels=labels,
                                   transfer_from=pred_p.transfer_from).items():
            rows[label] = {"setting": s.describe(), "gflops": round(setup_gflops(s, dims), 6),
                           "gflops_fvcore": round(fvcore_of(s, model), 6)}
        table["datasets"][dataset] = rows
        click.echo(f"flops: {dataset}: " + ", ".join(f"{k} {v['gflops']:.4f}" for k, v in rows.items()))
    write_json_atomic(REPORTS / "flops.json", table)


if __name__ == "__main__":
    run(main)
