"""The accuracy gate against the committed metrics, as CI runs it: `python -m stages.check` in a real git repository
whose HEAD holds reports/metrics.json, with a new reports/metrics.json written over it."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clipprune import report

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.01
COMMITTED = {"synth/a": {"full": 0.90, "predictor": 0.88}, "synth/b": {"full": 0.70, "predictor": 0.66}}


def metrics(rows: dict) -> dict:
    """reports/metrics.json as the report stage writes it, from {dataset: {method: acc1}}."""
    return report.build_metrics({d: {m: {"metrics": {"acc1": a}, "gflops": 1.0} for m, a in r.items()} for d, r in rows.items()})


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=cwd, check=True,
                   capture_output=True)


def write_project(path: Path, rows: dict) -> None:
    """params.yaml (prune.method predictor, check.tolerance 0.01, a max_drop that never fires) and the metrics."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prune"]["method"] = "predictor"
    params["check"].update(max_drop=0.5, tolerance=TOLERANCE)
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.yaml").write_text(yaml.safe_dump(params))
    (path / "reports").mkdir(exist_ok=True)
    (path / "reports" / "metrics.json").write_text(json.dumps(metrics(rows)))


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git repository whose HEAD commits reports/metrics.json with COMMITTED's accuracies."""
    write_project(tmp_path, COMMITTED)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "metrics")
    return tmp_path


@pytest.fixture
def check(monkeypatch, capsys):
    """Run the check stage in `cwd` with `PATH`: as a process (as CI does) or, faster, in this process (the stage
    itself starts git as a process either way). Returns (returncode, stdout, stderr)."""
    def go(cwd: Path, *args: str, path: str = "/usr/bin:/bin", process: bool = False) -> subprocess.CompletedProcess:
        if process:
            env = {"PYTHONPATH": str(ROOT), "PATH": path, "HOME": str(cwd), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
            return subprocess.run([sys.executable, "-m", "stages.check", *args], cwd=cwd, env=env, capture_output=True,
                                  text=True, timeout=120)
        from clipprune.cli import run
        from stages.check import main

        capsys.readouterr()
        with monkeypatch.context() as mp:
            mp.chdir(cwd)
            mp.setenv("PATH", path)
            mp.setattr(sys, "argv", ["stages.check", *args])
            try:
                run(main)
                code = 0
            except SystemExit as e:
                code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return go


def changed(**edits) -> dict:
    """COMMITTED with edits like synth_b__predictor=0.6 (a new acc1) or synth_b=None (the dataset gone)."""
    rows = json.loads(json.dumps(COMMITTED))
    for key, value in edits.items():
        d, _, m = key.replace("synth_", "synth/").partition("__")
        if m and value is None:
            del rows[d][m]
        elif m:
            rows[d][m] = value
        else:
            del rows[d]
    return rows


@pytest.mark.parametrize("edits,code,says", [
    ({}, 0, "no regression beyond check.tolerance against the committed metrics"),
    ({"synth_b__full": 0.70 - TOLERANCE / 2}, 0, "no regression beyond"),  # within tolerance
    ({"synth_b__full": 0.70 - 2 * TOLERANCE}, 1, "synth/b/full acc1 fell 0.7000 -> 0.6800, beyond check.tolerance=0.01"),
    ({"synth_a__predictor": 0.80}, 1, "synth/a/predictor acc1 fell 0.8800 -> 0.8000"),
    ({"synth_b": None}, 1, "synth/b/full is in the committed metrics but not in the new ones"),
    ({"synth_a__predictor": None, "synth_b__predictor": None}, 1, "no mean acc1 for 'predictor'"),
])
def test_gate_compares_with_the_metrics_committed_at_head(repo, check, edits, code, says):
    write_project(repo, changed(**edits))
    out = check(repo)
    assert out.returncode == code, out.stderr + out.stdout
    assert says in (out.stdout if code == 0 else out.stderr)


def test_a_method_missing_from_one_dataset_fails(repo, check):
    """A row dropped from one dataset only (the means still exist) is a failure, not a skip."""
    metrics_now = metrics(COMMITTED)
    del metrics_now["datasets"]["synth/b"]["predictor"]
    (repo / "reports" / "metrics.json").write_text(json.dumps(metrics_now))
    out = check(repo)
    assert out.returncode == 1 and "synth/b/predictor is in the committed metrics but not in the new ones" in out.stderr


def test_the_project_may_sit_below_the_git_root(tmp_path, check):
    """DVC projects inside a larger repository: HEAD's copy is found relative to the working directory."""
    project = tmp_path / "sub" / "project"
    write_project(project, COMMITTED)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "metrics")
    write_project(project, changed(synth_a__full=0.5))
    out = check(project)
    assert out.returncode == 1 and "synth/a/full acc1 fell" in out.stderr, out.stderr + out.stdout


def one_line_error(out, *needles):
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(n in lines[0] for n in needles), lines


def test_without_git_the_gate_refuses_rather_than_passes(tmp_path, repo, check):
    """--against-git (the default) with no git program, or outside any repository: exit 2, never a silent pass."""
    bin_dir = tmp_path / "bin"  # a PATH without git
    bin_dir.mkdir()
    one_line_error(check(repo, path=str(bin_dir), process=True), "needs git", "--no-against-git")
    elsewhere = tmp_path / "elsewhere"
    write_project(elsewhere, COMMITTED)
    shutil.rmtree(repo / ".git")
    for cwd in (repo, elsewhere):
        one_line_error(check(cwd), "git cannot read the repository", "--no-against-git")
    out = check(repo, "--no-against-git", path=str(bin_dir))
    assert out.returncode == 0 and "not compared with committed metrics (--no-against-git)" in out.stdout


def test_nothing_committed_yet_passes_and_says_so(tmp_path, check):
    """A project's first run (no commit, or metrics not committed yet) has nothing to regress from: it passes and
    says that no regression check ran."""
    write_project(tmp_path, COMMITTED)
    git(tmp_path, "init", "-q")
    out = check(tmp_path)  # no commit at all
    assert out.returncode == 0 and "no reports/metrics.json committed at HEAD" in out.stdout, out.stderr
    git(tmp_path, "add", "params.yaml")
    git(tmp_path, "commit", "-q", "-m", "params only")
    out = check(tmp_path)
    assert out.returncode == 0 and "no reports/metrics.json committed at HEAD" in out.stdout, out.stderr


def test_an_unreadable_committed_copy_is_an_error(repo, check):
    (repo / "reports" / "metrics.json").write_text("{not json")
    git(repo, "commit", "-q", "-am", "broken")
    write_project(repo, COMMITTED)
    one_line_error(check(repo), "committed reports/metrics.json", "cannot be read")


def test_ci_runs_the_gate_as_a_process(repo, check):
    """From the shell, as CI and dvc repro run it: a regression beyond check.tolerance is exit 1, none is exit 0."""
    write_project(repo, changed(synth_a__predictor=0.88 - 2 * TOLERANCE))
    out = check(repo, process=True)
    assert out.returncode == 1 and out.stderr.splitlines() == [
        "check failed: synth/a/predictor acc1 fell 0.8800 -> 0.8600, beyond check.tolerance=0.01"], out.stderr
    write_project(repo, COMMITTED)
    out = check(repo, process=True)
    assert out.returncode == 0 and "no regression beyond check.tolerance" in out.stdout, out.stderr
