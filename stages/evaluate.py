"""evaluate: zero-shot top-1 of every dataset x row at matched GFLOPs -> reports/eval/<dataset>/<row>.json."""
import click
from tqdm import tqdm

from clipprune import config
from clipprune.dist import barrier, device, init_from_env, my_share, shutdown
from clipprune.experiment import eval_labels, evaluate_setup, setups_for
from clipprune.io import check_writable, write_json_atomic
from clipprune.pipeline import REPORTS, read_report, safe_name
from clipprune.runner import params_opt, run
from clipprune.zeroshot import result_record


@click.command()
@params_opt
def main(params_path: str) -> None:
    """Evaluate each eval.methods row (and the predictor.transfer_from rows) on each dataset's test split through
    clip_benchmark."""
    data, model_p, prune_p, golden, eval_p, pred_p = config.load("data", "model", "prune", "golden", "eval", "predictor",
                                                                 path=params_path)
    labels = eval_labels(eval_p, data, pred_p)
    check_writable(REPORTS / "eval")
    flops = read_report("flops.json", stage="flops")["datasets"]
    from clipprune import vit as V
    from clipprune.pipeline import load_clip

    dims = V.ViTDims.of(load_clip(model_p)[0].visual)
    jobs = [(d, label, s) for d in data.datasets
            for label, s in setups_for(d, data=data, golden=golden, prune=prune_p, dims=dims, labels=labels,
                                       transfer_from=pred_p.transfer_from).items()]
    init_from_env()  # under torchrun, each process evaluates its share of the runs (each run whole)
    for dataset, label, setup in tqdm(my_share(jobs), desc="evaluate", unit="run"):
        metrics = evaluate_setup(setup, dataset=dataset, data=data, model_params=model_p, eval_params=eval_p,
                                 device=device())
        record = result_record(dataset=dataset, model=model_p.arch, pretrained=model_p.pretrained or "clipprune-pretrain",
                               metrics=metrics, method=label, keep=setup.keep, layer=setup.layer,
                               gflops=flops[dataset][label]["gflops"], extra={"setting": setup.describe()})
        write_json_atomic(REPORTS / "eval" / safe_name(dataset) / f"{safe_name(label)}.json", record)
        tqdm.write(f"{dataset:>16} {label:>18}: acc1 {metrics['acc1']:.4f}")
    barrier()
    shutdown()


if __name__ == "__main__":
    run(main)
