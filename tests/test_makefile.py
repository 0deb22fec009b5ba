"""The Makefile as a user meets it: `make paper` may reach the hub and never overwrites an edited params.yaml;
`make repro`/`make test` stay offline; `make default` is the way back. Run through real make and git, in a copy
of the project's files, with a stand-in venv whose python/dvc/pip record how they were called."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RECORDER = """#!/bin/sh
echo "$(basename "$0") $* HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-unset}" >> "$LOG"
"""

pytestmark = pytest.mark.skipif(not shutil.which("make") or not shutil.which("git"), reason="needs make and git")


@pytest.fixture
def project(tmp_path):
    for name in ("Makefile", "params.yaml", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "profiles", tmp_path / "profiles")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_text("{}\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=tmp_path, check=True)
    bin_ = tmp_path / ".venv" / "bin"
    bin_.mkdir(parents=True)
    for tool in ("python", "pip", "dvc"):
        (bin_ / tool).write_text(RECORDER)
        (bin_ / tool).chmod(0o755)
    (tmp_path / ".venv" / ".installed").touch()  # newer than pyproject.toml: nothing to install
    return tmp_path


def make(project, *targets):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["LOG"] = str(project / "calls.log")
    return subprocess.run(["make", "--no-print-directory", *targets], cwd=project, env=env, capture_output=True, text=True)


def calls(project) -> list[str]:
    log = project / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_paper_runs_online_after_its_prerequisite_check(project):
    out = make(project, "paper")
    assert out.returncode == 0, out.stderr
    assert (project / "params.yaml").read_text() == (project / "profiles" / "paper.yaml").read_text()
    log = calls(project)
    assert log[0].startswith("pip install -q -e .[paper]")  # the paper extra (gdown) first
    check = next(i for i, c in enumerate(log) if c.startswith("python -m stages.data --check-only"))
    repro = next(i for i, c in enumerate(log) if c.startswith("dvc repro"))
    assert check < repro  # prerequisites checked before anything is fetched
    assert all("HF_HUB_OFFLINE=unset" in c for c in log), log  # the OpenAI weights can be fetched


def test_repro_and_test_stay_offline(project):
    for target in ("repro", "test"):
        assert make(project, target).returncode == 0
    assert calls(project) and all("HF_HUB_OFFLINE=1" in c for c in calls(project)), calls(project)


def test_paper_never_overwrites_an_edited_params_file(project):
    edited = (project / "params.yaml").read_text().replace("keep: 0.6", "keep: 0.5")
    (project / "params.yaml").write_text(edited)
    out = make(project, "paper")
    assert out.returncode == 2
    assert "params.yaml has uncommitted edits" in out.stderr and "git stash" in out.stderr
    assert (project / "params.yaml").read_text() == edited and not calls(project)  # nothing ran, nothing changed


def test_default_is_the_way_back(project):
    original = (project / "params.yaml").read_text()
    assert make(project, "paper").returncode == 0
    assert make(project, "paper").returncode == 0  # a rerun on the paper profile is allowed
    (project / "reports" / "metrics.json").write_text('{"paper": 1}\n')
    assert make(project, "default").returncode == 0
    assert (project / "params.yaml").read_text() == original
    assert (project / "reports" / "metrics.json").read_text() == "{}\n"
    assert calls(project)[-1].startswith("dvc checkout")


def test_stages_leave_the_hub_reachable():
    """The CLI builds random towers and goes offline in its main(); the stages import the package too, and the paper
    run's pretrain stage must reach the hub for the OpenAI weights: importing a stage must not switch it off."""
    import subprocess as sp
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["PYTHONPATH"] = str(ROOT)
    code = "import os, stages.pretrain, stages.data, clipprune.cli; print(os.environ.get('HF_HUB_OFFLINE'))"
    out = sp.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr


def test_gpu_check_runs_offline_in_the_venv_within_its_budget(project):
    out = make(project, "gpu-check")
    assert out.returncode == 0, out.stderr
    assert calls(project) == ["python benchmarks/gpu_check.py --budget-s 420 HF_HUB_OFFLINE=1"]
    assert make(project, "gpu-check", "GPU_CHECK_BUDGET=60", "GPU_CHECK_ARGS=--device cpu").returncode == 0
    assert calls(project)[-1] == "python benchmarks/gpu_check.py --budget-s 60 --device cpu HF_HUB_OFFLINE=1"


def test_gpu_check_with_an_interpreter_of_its_own_builds_no_venv(project):
    """CHECK_PY (a GPU box's python3 with carried wheels) runs the check without touching .venv, even a stale one."""
    (project / ".venv" / ".installed").unlink()  # a venv that `make test` would rebuild first
    out = make(project, "gpu-check", f"CHECK_PY={project / '.venv' / 'bin' / 'python'}")
    assert out.returncode == 0, out.stderr
    assert calls(project) == ["python benchmarks/gpu_check.py --budget-s 420 HF_HUB_OFFLINE=1"]  # no pip install
