"""check: the accuracy gate. Judges prune.method against full and against the committed metrics.

The pipeline runs it with --record: the verdict lands in reports/check.json (a DVC metric, so `dvc exp show`
lists it) and an experiment that regresses still completes. Run plainly (as CI does on main) it exits 1 on
a failed verdict, one line per failure.
"""
import json
import subprocess
import sys
from pathlib import Path

import click

from clipprune import config, report
from clipprune.errors import ClipPruneError
from clipprune.io import write_json_atomic
from clipprune.pipeline import REPORTS
from clipprune.runner import params_opt, run


def git(*args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise ClipPruneError("check --against-git needs git, which is not installed: install it, or pass "
                             "--no-against-git to skip the comparison with the committed metrics") from None


def committed_metrics(path: str) -> dict | None:
    """`path` as committed at HEAD; None only when git works and HEAD has no such file (a project's first run).

    Asked to compare (--against-git), a broken comparison must not pass as "nothing to compare": no git, not a
    repository, or an unreadable committed copy is an error, not a silently disarmed gate.
    """
    repo = git("rev-parse", "--git-dir")
    if repo.returncode != 0:
        why = (repo.stderr.strip().splitlines() or ["git failed"])[-1]
        raise ClipPruneError(f"check --against-git compares {path} with its committed copy, but git cannot read the "
                             f"repository at {Path.cwd()} ({why}): run it in the repository, or pass --no-against-git")
    if git("rev-parse", "--verify", "--quiet", "HEAD").returncode != 0:
        return None  # no commit yet
    spec = f"HEAD:./{path}"  # ./: relative to the working directory, wherever the git root is
    if git("cat-file", "-e", spec).returncode != 0:
        return None
    out = git("show", spec)
    try:
        if out.returncode != 0:
            raise ValueError(out.stderr.strip())
        committed = json.loads(out.stdout)
        if not isinstance(committed, dict):
            raise ValueError("not a JSON object")
        return committed
    except ValueError as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ClipPruneError(f"the committed {path} (git show {spec}) cannot be read: {reason}; fix or recommit it") from None


@click.command()
@params_opt
@click.option("--against-git/--no-against-git", default=True, help="Also compare with the committed metrics.")
@click.option("--record", is_flag=True,
              help="Write the verdict to reports/check.json and exit 0 whatever it says (the pipeline's last stage: "
                   "experiments complete and record it; CI judges main with the plain command).")
def main(params_path: str, against_git: bool, record: bool) -> None:
    """Fail when prune.method's mean acc1 is more than check.max_drop below full (observed, or with
    check.drop_estimate: upper, the upper end of the drop's paired-bootstrap 95% interval), or any acc1 regressed
    more than check.tolerance against the committed reports/metrics.json."""
    prune_p, check_p = config.load("prune", "check", path=params_path)
    path = REPORTS / "metrics.json"
    if not path.is_file():
        raise ClipPruneError(f"no {path}: run the pipeline first (make repro)")
    metrics = json.loads(path.read_text())
    committed = committed_metrics(str(path)) if against_git else None
    failures = report.gate(metrics, committed, method=prune_p.method, max_drop=check_p.max_drop, tolerance=check_p.tolerance,
                           estimate=check_p.drop_estimate)
    mean = metrics.get("mean", {})
    known = {"full", prune_p.method} <= set(mean)
    drop = report.judged_drop(metrics, method=prune_p.method, estimate=check_p.drop_estimate) if known else None
    if record:
        write_json_atomic(REPORTS / "check.json", {
            "passed": not failures, "method": prune_p.method, "mean_drop": None if drop is None else round(drop, 6),
            "drop_estimate": check_p.drop_estimate, "max_drop": check_p.max_drop, "tolerance": check_p.tolerance,
            "compared_with_git": committed is not None, "failures": failures})
    for f in failures:
        click.echo(f"check failed: {f}", err=True)
    if failures:
        sys.exit(0 if record else 1)
    versus = ("not compared with committed metrics (--no-against-git)" if not against_git else
              "no regression beyond check.tolerance against the committed metrics" if committed is not None else
              f"no {path} committed at HEAD, so no regression check: commit it to arm one")
    judged = "mean drop" if check_p.drop_estimate == "point" else "mean drop (upper end of its 95% interval)"
    click.echo(f"check passed: {prune_p.method} {judged} {drop:+.4f} vs full (max {check_p.max_drop}); {versus}")


if __name__ == "__main__":
    run(main)
