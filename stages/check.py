"""check: the accuracy gate. Fails (exit 1, one line per failure) when pruning costs more than allowed."""
import json
import subprocess
import sys

import click

from clipprune import config, report
from clipprune.cli import params_opt, run
from clipprune.errors import ClipPruneError
from clipprune.pipeline import REPORTS


def committed_metrics(path: str) -> dict | None:
    """reports/metrics.json as committed at HEAD (None when there is no git or no committed copy)."""
    out = subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else None


@click.command()
@params_opt
@click.option("--against-git/--no-against-git", default=True, help="Also compare with the committed metrics.")
def main(params_path: str, against_git: bool) -> None:
    """Fail when prune.method's mean acc1 is more than check.max_drop below full, or any acc1 regressed
    more than check.tolerance against the committed reports/metrics.json."""
    prune_p, check_p = config.load("prune", "check", path=params_path)
    path = REPORTS / "metrics.json"
    if not path.is_file():
        raise ClipPruneError(f"no {path}: run the pipeline first (make repro)")
    metrics = json.loads(path.read_text())
    committed = committed_metrics(str(path)) if against_git else None
    failures = report.gate(metrics, committed, method=prune_p.method, max_drop=check_p.max_drop, tolerance=check_p.tolerance)
    if failures:
        for f in failures:
            click.echo(f"check failed: {f}", err=True)
        sys.exit(1)
    drop = metrics["mean"]["full"]["acc1"] - metrics["mean"][prune_p.method]["acc1"]
    click.echo(f"check passed: {prune_p.method} mean drop {drop:+.4f} vs full (max {check_p.max_drop}); "
               f"{'compared with committed metrics' if committed else 'no committed metrics to compare'}")


if __name__ == "__main__":
    run(main)
