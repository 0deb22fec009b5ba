"""The command line as a user runs it: a real subprocess, exit codes, one-line errors."""
import json
import subprocess
import sys

import pytest


def clipprune(*args):
    return subprocess.run([sys.executable, "-m", "clipprune.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    out = clipprune("--help")
    assert out.returncode == 0
    for cmd in ("flops", "bench", "match"):
        assert cmd in out.stdout


def test_flops_json_on_a_small_grid():
    out = clipprune("flops", "--model", "ViT-B-32", "--image-size", "96", "--method", "cls_attention", "-o", "fuse=true",
                    "--keep", "0.5", "--layer", "2", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["fuse"] is True and r["image_size"] == 96
    assert r["pruned_gflops"] < r["full_gflops"]
    assert r["pruned_gflops"] == pytest.approx(r["pruned_gflops_analytic"], rel=0.01)


BAD = [
    (["flops", "--keep", "0"], "keep must be in (0, 1]"),
    (["flops", "--layer", "12"], "layer must be in [0, 12)"),
    (["flops", "--method", "evit"], "unknown method"),
    (["flops", "--model", "ViT-Nope"], "unknown model"),
    (["flops", "-o", "fuse"], "not key=value"),
    (["bench", "--batch", "0"], "--batch"),
    (["match", "--keep", "1.5"], "keep must be in (0, 1]"),
]


@pytest.mark.parametrize("args,msg", BAD)
def test_bad_input_is_one_line_and_exit_2(args, msg, capsys):
    """In-process (the interpreter start costs more than the check): run() turns the error into one line."""
    from clipprune.cli import cli, run

    with pytest.raises(SystemExit) as e, pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["clipprune", *args])
        run(cli)
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert e.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], lines


@pytest.mark.parametrize("args,msg", [BAD[0], BAD[3]])
def test_bad_input_from_the_shell_has_no_traceback(args, msg):
    out = clipprune(*args)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and msg in lines[0], out.stderr


def test_match_reports_each_baseline():
    out = clipprune("match", "--model", "ViT-B-16", "--keep", "0.6", "--layer", "3", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    for k in ("random", "cls_attention", "cls_attention+fuse", "tome"):
        assert r[k]["rel_error"] <= 0.01


def test_bench_runs_and_reports_ratios():
    out = clipprune("bench", "--model", "ViT-B-32", "--image-size", "64", "--keep", "0.5", "--layer", "1",
                    "--batch", "2", "--repeats", "2", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["measured_speedup"] > 0 and r["flops_speedup"] > 1
    assert r["measured_over_flops"] == pytest.approx(r["measured_speedup"] / r["flops_speedup"], rel=1e-3)
