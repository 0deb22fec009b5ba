"""evaluate: zero-shot top-1 of every dataset x row at matched GFLOPs -> reports/eval/<dataset>/<row>.json."""
import click
from tqdm import tqdm

from clipprune import config
from clipprune.dist import barrier, device, init_from_env, my_share, shutdown
from clipprune.experiment import eval_labels, evaluate_dataset, setups_for
from clipprune.io import check_writable, write_json_atomic
from clipprune.pipeline import REPORTS, read_report, safe_name
from clipprune.runner import params_opt, run
from clipprune.stats import to_bits
from clipprune.zeroshot import result_record


@click.command()
@params_opt
def main(params_path: str) -> None:
    """Evaluate each eval.methods row (and the predictor.transfer_from rows) on each dataset's test split: every row
    in one pass over the images, with clip_benchmark's classifier, logits and metrics; per-image top-1 recorded."""
    data, model_p, prune_p, golden, eval_p, pred_p, compute = config.load(
        "data", "model", "prune", "golden", "eval", "predictor", "compute", path=params_path)
    labels = eval_labels(eval_p, data, pred_p)
    check_writable(REPORTS / "eval")
    flops = read_report("flops.json", stage="flops")["datasets"]
    from clipprune import vit as V
    from clipprune.pipeline import load_clip

    clip = load_clip(model_p, device=device())  # once: every dataset and row runs on it
    dims = V.ViTDims.of(clip[0].visual)
    jobs = [(d, label, s) for d in data.datasets
            for label, s in setups_for(d, data=data, golden=golden, prune=prune_p, dims=dims, labels=labels,
                                       transfer_from=pred_p.transfer_from).items()]
    init_from_env()  # under torchrun, each process evaluates its share of the rows (each row whole)
    mine = my_share(jobs)
    for dataset in tqdm(dict.fromkeys(d for d, _, _ in mine), desc="evaluate", unit="dataset"):
        setups = {label: s for d, label, s in mine if d == dataset}  # one pass over the images for all of them
        results = evaluate_dataset(setups, dataset=dataset, data=data, model_params=model_p, eval_params=eval_p,
                                   compute=compute, device=device(), clip=clip)
        for label, setup in setups.items():
            metrics = results[label].metrics
            record = result_record(dataset=dataset, model=model_p.arch,
                                   pretrained=model_p.pretrained or "clipprune-pretrain", metrics=metrics, method=label,
                                   keep=setup.keep, layer=setup.layer, gflops=flops[dataset][label]["gflops"],
                                   extra={"setting": setup.describe(),
                                          # paired statistics (clipprune.stats) resample these, image by image
                                          "per_image_top1": to_bits(results[label].correct)})
            write_json_atomic(REPORTS / "eval" / safe_name(dataset) / f"{safe_name(label)}.json", record)
            tqdm.write(f"{dataset:>16} {label:>18}: acc1 {metrics['acc1']:.4f}")
    barrier()
    shutdown()


if __name__ == "__main__":
    run(main)
