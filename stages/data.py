"""data: put the profile's datasets under data.root (generate the synthetic world, copy a local root, or download).

Prerequisites first (clipprune.prereq: every dataset present or downloadable, packages, disk), all reported at
once before anything is fetched; `--check-only` stops there (make paper runs it before dvc repro). Then the
whole of data.root is built as data.root.partial and renamed into place only when every dataset is staged,
loads, and every image decodes: a failed run leaves no output at all.
"""
import dataclasses

import click

from clipprune import config, prereq
from clipprune.data import materialise, staged_dir
from clipprune.io import check_writable
from clipprune.pipeline import dataset_root
from clipprune.runner import params_opt, run


@click.command()
@params_opt
@click.option("--check-only", is_flag=True,
              help="Only check the prerequisites (datasets present or downloadable, packages, disk); fetch nothing.")
def main(params_path: str, check_only: bool) -> None:
    """Materialise every dataset in data.datasets; the synthetic tasks share one generated world."""
    (data,) = config.load("data", path=params_path)
    check_writable(data.root)  # one line before any check or fetch
    plans = prereq.require(data)
    if check_only:
        for plan in plans:
            click.echo(f"data: {plan}")
        click.echo(f"data: prerequisites met ({params_path})")
        return
    with staged_dir(data.root) as tmp:
        staging = dataclasses.replace(data, root=str(tmp))
        done = set()
        for name in data.datasets:
            root = dataset_root(staging, name)
            kind = "synth" if name.startswith("synth/") else name
            if (kind, root) in done:
                continue
            materialise(kind, dest=root, source=data.source, cache=data.cache, n_train=data.n_train,
                        n_test=data.n_test, seed=data.seed, download=data.download)
            done.add((kind, root))
            click.echo(f"data: {name} -> {dataset_root(data, name)}")


if __name__ == "__main__":
    run(main)
