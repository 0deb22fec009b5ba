"""sweep: accuracy of each method across keep ratios, every point at the predictor's GFLOPs for that keep."""
import click
from tqdm import tqdm

from clipprune import config
from clipprune import vit as V
from clipprune.dist import device, gather, init_from_env, my_share, shutdown
from clipprune.experiment import digest, evaluate_dataset, setup_gflops, setups_for, sweep_indices
from clipprune.io import check_writable, write_json_atomic
from clipprune.pipeline import REPORTS, load_clip
from clipprune.runner import params_opt, run


@click.command()
@params_opt
def main(params_path: str) -> None:
    """Write reports/sweep.json: one row per dataset x method x keep (acc1, GFLOPs), on eval.sweep_images images
    per dataset: a class-stratified sample of its ranked test images drawn with data.seed, the same for every
    method and keep (each row names it by its digest)."""
    data, model_p, prune_p, golden, eval_p, compute = config.load("data", "model", "prune", "golden", "eval", "compute",
                                                                  path=params_path)
    check_writable(REPORTS)
    clip = load_clip(model_p, device=device())  # once: every dataset and point runs on it
    dims = V.ViTDims.of(clip[0].visual)
    jobs = [(d, k, label, s) for d in data.datasets for k in eval_p.sweep_keeps
            for label, s in setups_for(d, data=data, golden=golden, prune=prune_p, dims=dims,
                                       labels=tuple(eval_p.sweep_methods), keep=k).items()]
    subsets = {d: sweep_indices(d, data=data, n=eval_p.sweep_images) for d in data.datasets}  # once per dataset
    rank, _ = init_from_env()  # under torchrun, each process runs its share of the points (each point whole)
    rows = []
    mine = my_share(list(enumerate(jobs)))
    for dataset in tqdm(dict.fromkeys(job[0] for _, job in mine), desc="sweep", unit="dataset"):
        points = {i: job for i, job in mine if job[0] == dataset}  # one pass over the images for all of them
        results = evaluate_dataset({i: job[3] for i, job in points.items()}, dataset=dataset, data=data,
                                   model_params=model_p, eval_params=eval_p, compute=compute,
                                   indices=subsets[dataset], device=device(), clip=clip)
        for i, (_, keep, label, setup) in points.items():
            rows.append((i, {"dataset": dataset, "method": label, "keep": keep,
                             "gflops": round(setup_gflops(setup, dims), 6), "acc1": results[i].metrics["acc1"],
                             "images": digest(subsets[dataset])}))
    rows = gather(rows)
    if rank == 0:
        write_json_atomic(REPORTS / "sweep.json", {"images_per_point": eval_p.sweep_images,
                                                   "sampling": "class-stratified, seeded by data.seed",
                                                   "rows": [r for _, r in sorted(rows, key=lambda t: t[0])]})
    shutdown()


if __name__ == "__main__":
    run(main)
