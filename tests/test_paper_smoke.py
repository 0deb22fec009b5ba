"""The paper profile end to end: random ViT-B-16-quickgelu weights, a tiny generated CoOp layout, every stage.

Opt-in (about two minutes of CPU): `make smoke-paper`, or CLIPPRUNE_SMOKE=1 pytest tests/test_paper_smoke.py.
Smoke sizes (a handful of images, 7x7-patch golden units, one epoch) replace the profile's; the model, the
pruning layer and keep, the label score, the CoOp protocol and every stage are the paper profile's own.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_coop import make_coop

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["data", "pretrain", "golden", "predictor", "tune", "flops", "evaluate", "sweep", "report"]


@pytest.mark.skipif(not os.environ.get("CLIPPRUNE_SMOKE"), reason="opt-in: make smoke-paper")
def test_paper_profile_runs_every_stage(tmp_path):
    from clipprune.model import build_model, save_checkpoint

    make_coop(tmp_path / "fake", "OxfordPets")
    model, _, _ = build_model("ViT-B-16-quickgelu")
    save_checkpoint(model, tmp_path / "vitb16-random.pt", arch="ViT-B-16-quickgelu")
    params = yaml.safe_load((ROOT / "profiles" / "paper.yaml").read_text())
    params["data"].update(datasets=["coop/OxfordPets"], source=str(tmp_path / "fake"), download=False)
    params["model"]["pretrained"] = str(tmp_path / "vitb16-random.pt")
    params["golden"].update(unit=7, per_round=1, n_train=6, batch_size=2, shard_size=2, chunk_tokens=4096)
    params["predictor"].update(epochs=2, batch_size=2)
    params["tune"].update(epochs=1, shots=1, batch_size=3)
    params["eval"].update(batch_size=8, sweep_keeps=[0.6, 1.0], sweep_images=6, overlay_images=2)
    params["check"]["max_drop"] = 1.0  # random weights: accuracies are noise, the gate's logic is tested elsewhere
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for stage in STAGES + ["check"]:
        args = ["--no-against-git"] if stage == "check" else []
        out = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{stage}: {out.stderr[-3000:]}"
    # Sharded under torchrun (2 processes, gloo here, nccl on GPUs), evaluate and sweep write identical results.
    one = {p.relative_to(tmp_path): p.read_text() for p in [*(tmp_path / "reports" / "eval").rglob("*.json"),
                                                            tmp_path / "reports" / "sweep.json"]}
    for stage in ("evaluate", "sweep"):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", f"stages.{stage}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{stage} x2: {out.stderr[-3000:]}"
    assert {p: (tmp_path / p).read_text() for p in one} == one
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert set(metrics["datasets"]["coop/OxfordPets"]) == set(params["eval"]["methods"])
    flops = json.loads((tmp_path / "reports" / "flops.json").read_text())["datasets"]["coop/OxfordPets"]
    assert flops["full"]["gflops"] == pytest.approx(17.56, rel=0.01)
    assert flops["golden"]["gflops"] == pytest.approx(12.25, rel=0.01)  # keep 0.6 at L=3
    for row in ("random", "cls_attention", "tome"):
        assert flops[row]["gflops"] == pytest.approx(flops["predictor"]["gflops"], rel=0.01)
        assert flops[row]["gflops_fvcore"] == pytest.approx(flops[row]["gflops"], rel=0.01)
