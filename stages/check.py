"""check: the accuracy gate. Judges prune.method against full and against the committed metrics.

The pipeline runs it with --record: the verdict lands in reports/check.json (a DVC metric, so `dvc exp show`
lists it) and an experiment that regresses still completes. Run plainly (as CI does on main) it exits 1 on
a failed verdict, one line per failure.
"""
import json
import subprocess
import sys

import click

from clipprune import config, report
from clipprune.runner import params_opt, run
from clipprune.errors import ClipPruneError
from clipprune.io import write_json_atomic
from clipprune.pipeline import REPORTS


def committed_metrics(path: str) -> dict | None:
    """reports/metrics.json as committed at HEAD (None when there is no git or no committed copy)."""
    out = subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else None


@click.command()
@params_opt
@click.option("--against-git/--no-against-git", default=True, help="Also compare with the committed metrics.")
@click.option("--record", is_flag=True,
              help="Write the verdict to reports/check.json and exit 0 whatever it says (the pipeline's last stage: "
                   "experiments complete and record it; CI judges main with the plain command).")
def main(params_path: str, against_git: bool, record: bool) -> None:
    """Fail when prune.method's mean acc1 is more than check.max_drop below full, or any acc1 regressed
    more than check.tolerance against the committed reports/metrics.json."""
    prune_p, check_p = config.load("prune", "check", path=params_path)
    path = REPORTS / "metrics.json"
    if not path.is_file():
        raise ClipPruneError(f"no {path}: run the pipeline first (make repro)")
    metrics = json.loads(path.read_text())
    committed = committed_metrics(str(path)) if against_git else None
    failures = report.gate(metrics, committed, method=prune_p.method, max_drop=check_p.max_drop, tolerance=check_p.tolerance)
    mean = metrics.get("mean", {})
    drop = mean["full"]["acc1"] - mean[prune_p.method]["acc1"] if {"full", prune_p.method} <= set(mean) else None
    if record:
        write_json_atomic(REPORTS / "check.json", {
            "passed": not failures, "method": prune_p.method, "mean_drop": None if drop is None else round(drop, 6),
            "max_drop": check_p.max_drop, "tolerance": check_p.tolerance, "compared_with_git": committed is not None,
            "failures": failures})
    for f in failures:
        click.echo(f"check failed: {f}", err=True)
    if failures:
        sys.exit(0 if record else 1)
    click.echo(f"check passed: {prune_p.method} mean drop {drop:+.4f} vs full (max {check_p.max_drop}); "
               f"{'compared with committed metrics' if committed else 'no committed metrics to compare'}")


if __name__ == "__main__":
    run(main)
