"""The command line as a user runs it: a real subprocess, exit codes, one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

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


def field_notes_gflops(tokens: list[int], *, d: int = 768, patches: int = 196, patch: int = 16, out: int = 512,
                       extra: float = 0) -> float:
    """The field notes' closed form: patch embedding + 12*n*d^2 + 2*n^2*d per block (n tokens entering it) +
    the output projection + a method's own matmuls, in GMACs."""
    return (patches * 3 * patch * patch * d + sum(12 * n * d * d + 2 * n * n * d for n in tokens) + d * out + extra) / 1e9


def test_match_reports_each_baseline():
    """Each setting `match` prints, recounted from the field notes' closed form (tokens per block, plus EViT's
    scoring: the CLS query and the 197 keys projected, one dot product per key) lands within 1% of the target,
    and one patch more or fewer would not land closer. ToMe's r is recounted by fvcore in test_flops."""
    out = clipprune("match", "--model", "ViT-B-16", "--keep", "0.6", "--layer", "3", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    target = field_notes_gflops([197] * 3 + [1 + 118] * 9)  # random keeps round(0.6 * 196) = 118 patches
    assert r["target_gflops"] == pytest.approx(target, abs=1e-4)
    scoring = 198 * 768 * 768 + 197 * 768
    for label, extra_tokens, extra in (("random", 0, 0), ("cls_attention", 0, scoring), ("cls_attention+fuse", 1, scoring)):
        n = r[label]["n_keep"]
        cost = [field_notes_gflops([197] * 3 + [1 + k + extra_tokens] * 9, extra=extra) for k in (n - 1, n, n + 1)]
        assert r[label]["gflops"] == pytest.approx(cost[1], rel=1e-9), label
        assert abs(cost[1] - target) / target <= 0.01 and abs(cost[1] - target) <= min(abs(c - target) for c in cost), label
    assert r["random"]["n_keep"] == 118


def test_bench_runs_and_reports_ratios():
    """From the shell: the FLOPs bound it reports is the closed form's ratio (ViT-B-32 at 64 px: 4 patches, 2
    kept from block 1 on; fvcore's LayerNorm counts, absent from the formula, move it by < 0.5%)."""
    out = clipprune("bench", "--model", "ViT-B-32", "--image-size", "64", "--keep", "0.5", "--layer", "1",
                    "--batch", "2", "--repeats", "2", "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    kw = dict(patches=4, patch=32)
    bound = field_notes_gflops([5] * 12, **kw) / field_notes_gflops([5] + [3] * 11, **kw)
    assert r["flops_speedup"] == pytest.approx(bound, rel=0.005)
    assert r["batch"] == 2 and r["repeats"] == 2 and r["measured_speedup"] > 0


def test_bench_times_the_full_and_the_pruned_model_alternately():
    """What the timed forwards actually ran: each timed round runs the unpruned model (17 tokens in the last
    block) then the pruned one (1 + 8 tokens), warm-up included, on the batch asked for."""
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from conftest import tiny_clip

    from clipprune import methods as M
    from clipprune.bench import throughput

    vit = tiny_clip().visual
    seen = []
    # fvcore's traced counting runs (batch 1) are not timed: only what runs outside tracing is recorded.
    vit.transformer.resblocks[-1].register_forward_pre_hook(
        lambda m, a: None if torch.jit.is_tracing() else seen.append(tuple(a[0].shape[:2])))
    r = throughput(vit, M.build_method("random"), keep=0.5, layer=1, batch=3, repeats=4, warmup=2)
    assert seen == [(3, 17), (3, 9)] * (2 + 4)
    assert r["batch"] == 3 and r["repeats"] == 4


def test_bench_runs_under_the_precision_asked_for():
    """Every timed forward runs under the autocast of --precision: the blocks' matmuls come out in bf16, and in
    float32 without it (a bench that ignored the precision would time float32 and call it bf16)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from conftest import tiny_clip

    from clipprune import methods as M
    from clipprune.bench import throughput

    vit = tiny_clip().visual
    for precision, want, used in (("bf16", torch.bfloat16, "bf16"), ("fp32", torch.float32, "fp32"),
                                  ("auto", torch.float32, "fp32")):  # auto: fp32 on the CPU
        seen = set()
        hook = vit.transformer.resblocks[-1].mlp.c_fc.register_forward_hook(
            lambda m, a, out: None if torch.jit.is_tracing() else seen.add(out.dtype))
        r = throughput(vit, M.build_method("random"), keep=0.5, layer=1, batch=2, repeats=1, warmup=0,
                       precision=precision)
        hook.remove()
        assert seen == {want}, (precision, seen)
        assert r["precision"] == used and r["device"] == "cpu"


def test_bench_passes_device_and_precision_through(monkeypatch):
    """`clipprune bench --device cpu --precision bf16` hands both to throughput (not only to its report)."""
    import clipprune.bench
    from clipprune.cli import cli, run

    got = {}
    monkeypatch.setattr(clipprune.bench, "throughput", lambda vit, m, **kw: got.update(kw) or {})
    monkeypatch.setattr(sys, "argv", ["clipprune", "bench", "--model", "clipprune-tiny", "--layer", "1", "--device",
                                      "cpu", "--precision", "bf16", "--json"])
    run(cli)
    assert str(got["device"]) == "cpu" and got["precision"] == "bf16"


def test_cuda_timings_wait_for_the_gpu(monkeypatch):
    """On CUDA the clock starts after the queue is drained and stops after the forward's kernels have run
    (torch.cuda.synchronize on both sides); on the CPU nothing is synchronised. Checked without a GPU: the
    forward is a stand-in, the device only chooses the timer."""
    import torch

    from clipprune.bench import timed

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", str(device))))
    timed(lambda: calls.append("forward"), device=torch.device("cuda:0"))
    assert calls == [("sync", "cuda:0"), "forward", ("sync", "cuda:0")]
    calls.clear()
    timed(lambda: calls.append("forward"), device=torch.device("cpu"))
    assert calls == ["forward"]
