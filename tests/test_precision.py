"""bf16 on the CPU against fp32, on the default world: every evaluated row's top-1 within 1 point, and the golden
search's keep sets nearly the same. A smaller run of the default profile (its generator, its architecture, its
settings; fewer images and steps) is built through the stages, then benchmarks/precision.py compares."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clipprune.precision import autocast, resolve

ROOT = Path(__file__).resolve().parent.parent


def test_resolve_and_autocast():
    """auto is fp16 on CUDA and fp32 elsewhere; fp32 and tf32 leave the CPU untouched, bf16 autocasts matmuls."""
    import torch

    assert resolve("auto", "cpu") == "fp32" and resolve("auto", "cuda:0") == "fp16"
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    for p in ("fp32", "tf32"):
        with autocast(p, "cpu"):
            assert (a @ b).dtype == torch.float32
    with autocast("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16


@pytest.mark.slow
def test_bf16_on_the_default_world_keeps_every_rows_top1_within_one_point(tmp_path):
    """A smaller default world (700 pretraining steps, 500 ranked train images, 1,000 test images): every row of
    eval.methods on every task in bf16 within 1 point of fp32. Measured here: at most 0.6 points (size and shape,
    cls_attention / tome). Not asserted: the issue's bar of 0.95 for the golden keep sets, which half precision
    does not meet (0.73 here in bf16, 0.83 in fp16; on the full default world 0.83 and 0.94): the README and
    benchmarks/precision.py report it. fp16 is not run here: without fp16 matmuls this CPU takes 7x fp32's time."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(n_train=6000, n_test=1000)
    params["pretrain"].update(steps=700)
    params["golden"].update(n_train=500)
    params["predictor"].update(epochs=15)
    params["tune"].update(epochs=5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for stage in ("data", "pretrain", "golden", "predictor", "tune"):
        out = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, f"{stage}: {out.stderr[-3000:]}"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "precision.py"), "--precision", "bf16",
                          "--golden-images", "50", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result["golden"])
    rows = [(d, row, a, b) for d, rs in result["acc1"].items() for row, (a, b) in rs.items()]
    assert len(rows) == len(params["data"]["datasets"]) * len(params["eval"]["methods"])
    # The model learned the tasks it can (a comparison of two chance-level runs would prove nothing).
    assert all(a > 0.6 for d, row, a, b in rows if row == "full" and not d.endswith("shape"))
    assert any(a != b for d, row, a, b in rows), "bf16 changed nothing: did the autocast run at all?"
    worst = max(rows, key=lambda r: abs(r[3] - r[2]))
    assert abs(worst[3] - worst[2]) <= 0.01, f"bf16 moved {worst[0]} {worst[1]} from {worst[2]} to {worst[3]}"
