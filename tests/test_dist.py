"""Processes and devices: how many processes a node runs, which device each owns, and that the golden stage
gives the same bytes on one process, under the launcher dvc.yaml runs, and on two torchrun "nodes"."""
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from clipprune.dist import NPROC_ENV, local_device, nproc_per_node
from clipprune.errors import ClipPruneError

ROOT = Path(__file__).resolve().parent.parent


# ---- the pure choices ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpus, cpus, override, want", [
    (0, 2, None, 2), (0, 16, None, 16), (0, 1, None, 1), (0, 0, None, 1),  # CPU: one process per usable core
    (1, 64, None, 1), (8, 64, None, 8),                                     # GPU: one per GPU, whatever the cores
    (0, 16, "3", 3), (8, 64, "4", 4), (0, 2, "", 2)])                       # CLIPPRUNE_NPROC wins
def test_nproc_per_node(gpus, cpus, override, want):
    assert nproc_per_node(n_gpus=gpus, n_cpus=cpus, override=override) == want


@pytest.mark.parametrize("gpus, override, message", [(0, "0", "positive"), (0, "two", "positive"),
                                                     (1, "2", "shows 1 GPU.*at most 1")])
def test_nproc_override_errors(gpus, override, message):
    with pytest.raises(ClipPruneError, match=f"{NPROC_ENV}=.*{message}") as e:
        nproc_per_node(n_gpus=gpus, n_cpus=8, override=override)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("local_rank, gpus, want", [(0, 0, "cpu"), (1, 0, "cpu"), (0, 1, "cuda:0"), (3, 8, "cuda:3"),
                                                    (7, 8, "cuda:7")])
def test_local_device(local_rank, gpus, want):
    assert local_device(local_rank=local_rank, n_gpus=gpus) == want


def test_a_one_gpu_box_never_asks_for_cuda_1():
    with pytest.raises(ClipPruneError, match=r"LOCAL_RANK 1 but 1 GPU\(s\) visible.*--nproc_per_node 1") as e:
        local_device(local_rank=1, n_gpus=1)
    assert "\n" not in str(e.value)


# ---- the golden stage, run as dvc.yaml runs it and as N machines run it ---------------------------------------
def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def tiny_golden_project(work: Path) -> Path:
    """A tiny default-profile project in `work`: generated world, random clipprune-tiny as models/clip.pt, 6 shards
    of 2 images per split so every process gets several. (benchmarks/gpu_check.py builds its NCCL check on it.)"""
    from clipprune.model import build_model, save_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(n_train=64, n_test=12)
    params["golden"].update(n_train=12, batch_size=2, shard_size=2)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "stages.data"], cwd=work, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    torch.manual_seed(0)
    save_checkpoint(build_model("clipprune-tiny")[0], work / "models" / "clip.pt", arch="clipprune-tiny")
    return work


@pytest.fixture(scope="module")
def golden_workdir(tmp_path_factory):
    return tiny_golden_project(tmp_path_factory.mktemp("project"))


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("rankings", "reports"))
    return dst


def outputs(work: Path) -> dict:
    files = sorted([*(work / "rankings").rglob("*"), work / "reports" / "golden.json"])
    return {str(p.relative_to(work)): p.read_bytes() for p in files if p.is_file()}


@pytest.fixture(scope="module")
def one_process(golden_workdir, tmp_path_factory):
    work = fresh_copy(golden_workdir, tmp_path_factory.mktemp("one") / "w")
    out = subprocess.run([sys.executable, "-m", "stages.golden", "--no-progress"], cwd=work, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = outputs(work)
    assert {"rankings/synth-train.pt", "rankings/synth-test.pt", "reports/golden.json"} <= set(result)
    return result


def dvc_cmd(stage: str) -> list[str]:
    return shlex.split(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"])


@pytest.mark.slow
def test_golden_stage_as_dvc_runs_it_equals_one_process(golden_workdir, one_process, tmp_path):
    cmd = dvc_cmd("golden")
    assert cmd[:3] == ["python", "-m", "stages.launch"]
    work = fresh_copy(golden_workdir, tmp_path / "w")
    out = subprocess.run([sys.executable, *cmd[1:]], cwd=work, env=env(**{NPROC_ENV: "2", "LOGLEVEL": "INFO"}),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "role_world_sizes=[2, 2]" in out.stderr  # torchrun's agent really started two workers
    assert outputs(work) == one_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str], cwd: Path, **extra) -> list[str]:
    """Run `args` (torchrun's script part) as two torchrun agents on localhost, one process each, the way two
    machines run it: the same command on each, a c10d rendezvous at one address. Returns each agent's output."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test", *args]
    nodes = [subprocess.Popen(cmd, cwd=cwd, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-3000:]
    return logs


def test_two_nodes_form_one_group(tmp_path):
    """Each worker joins one gloo group of two, with its own rank, on the CPU."""
    probe = tmp_path / "probe.py"
    probe.write_text("from clipprune.dist import device, init_from_env, shutdown\n"
                     "rank, world = init_from_env()\nprint(f'probe {rank} {world} {device()}')\nshutdown()\n")
    logs = two_nodes([str(probe)], tmp_path)
    seen = sorted(line for log in logs for line in log.splitlines() if line.startswith("probe "))
    assert seen == ["probe 0 2 cpu", "probe 1 2 cpu"]


@pytest.mark.slow
def test_two_torchrun_nodes_equal_one_process(golden_workdir, one_process, tmp_path):
    """Two torchrun agents on localhost, as two machines would run them (same command on each, c10d rendezvous,
    the project on a shared filesystem), one process each: a world of 2, byte-identical to one process."""
    work = fresh_copy(golden_workdir, tmp_path / "w")
    logs = two_nodes(["-m", "stages.golden", "--no-progress"], work, LOGLEVEL="INFO")
    # each agent joined one rendezvous as its own node of two (group_rank 0 and 1, world size 2)
    ranks = sorted(next(line.split("group_rank=")[1].split()[0] for line in log.splitlines() if "group_rank=" in line)
                   for log in logs)
    assert ranks == ["0", "1"] and all("group_world_size=2" in log for log in logs)
    assert outputs(work) == one_process


def test_launcher_errors_are_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    for extra, args, message in [({NPROC_ENV: "zero"}, ["golden"], f"error: {NPROC_ENV}='zero': set it to a positive"),
                                 ({}, ["train"], "error: usage: python -m stages.launch {golden,evaluate,sweep}")]:
        out = subprocess.run([sys.executable, "-m", "stages.launch", *args], cwd=tmp_path, env=env(**extra),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
        assert out.stderr.startswith(message), out.stderr


def test_launched_workers_fail_with_their_line_not_a_traceback(tmp_path):
    """Two workers that both stop on a user error (no models/clip.pt): exit 2, their error, no agent traceback."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    out = subprocess.run([sys.executable, "-m", "stages.launch", "golden", "--no-progress"], cwd=tmp_path,
                         env=env(**{NPROC_ENV: "2"}), capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = set(out.stderr.strip().splitlines())  # each worker says it: the same line twice
    assert lines == {"error: no trained model at models/clip.pt: run the pretrain stage first (dvc repro pretrain)"}, out.stderr
