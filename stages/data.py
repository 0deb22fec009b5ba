"""data: put the profile's datasets under data.root (generate the synthetic world, copy a local root, or download)."""
import click

from clipprune import config
from clipprune.cli import params_opt, run
from clipprune.data import materialise
from clipprune.io import check_writable
from clipprune.pipeline import dataset_root


@click.command()
@params_opt
def main(params_path: str) -> None:
    """Materialise every dataset in data.datasets; the synthetic tasks share one generated world."""
    (data,) = config.load("data", path=params_path)
    check_writable(*{dataset_root(data, name) for name in data.datasets})
    done = set()
    for name in data.datasets:
        root = dataset_root(data, name)
        kind = "synth" if name.startswith("synth/") else name
        if (kind, root) in done:
            continue
        materialise(kind, dest=root, source=data.source, n_train=data.n_train, n_test=data.n_test, seed=data.seed,
                    download=data.download)
        done.add((kind, root))
        click.echo(f"data: {name} -> {root}")


if __name__ == "__main__":
    run(main)
