"""The paper profile end to end as a GPU user meets it, shrunk to CPU minutes: every stage of profiles/paper.yaml
on random ViT-B-16-quickgelu weights written as an open_clip state dict (`open_clip_pytorch_model.bin`), and two
CoOp datasets staged together from one local DATA root laid out by CoOp's real split files (tiny stand-in images
at every listed path).

Opt-in (several minutes of CPU): `make smoke-paper`, or CLIPPRUNE_SMOKE=1 pytest tests/test_paper_smoke.py.
Smoke sizes (a few images, 7x7-patch golden units, one epoch, one shot) replace the profile's; the model, the
pruning layer and keep, the label score, the CoOp protocol, the tuning recipe and every stage are the profile's own.
The sharded stages run through their dvc.yaml commands (stages.launch: two processes here, one per GPU on a GPU box).
On CUDA the stages run on the GPU (benchmarks/gpu_check.py runs this test there).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from test_coop import REAL_SPLITS, make_coop_from_split

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("OxfordPets", "DTD")


@pytest.mark.skipif(not os.environ.get("CLIPPRUNE_SMOKE"), reason="opt-in: make smoke-paper")
@pytest.mark.skipif(not REAL_SPLITS.is_dir(), reason=f"{REAL_SPLITS} (CoOp's real split files) is absent: "
                                                     "set CLIPPRUNE_COOP_SPLITS to a copy")
def test_paper_profile_runs_every_stage(tmp_path):
    from clipprune.coop import COOP_DATASETS
    from clipprune.model import build_model

    for name in DATASETS:
        make_coop_from_split(tmp_path / "DATA", name, REAL_SPLITS / COOP_DATASETS[name].split_file)
    weights = tmp_path / "hub" / "open_clip_pytorch_model.bin"  # what a hub snapshot folder holds
    weights.parent.mkdir()
    torch.save(build_model("ViT-B-16-quickgelu")[0].state_dict(), weights)
    params = yaml.safe_load((ROOT / "profiles" / "paper.yaml").read_text())
    params["data"].update(datasets=[f"coop/{n}" for n in DATASETS], source=str(tmp_path / "DATA"), download=False,
                          cache=str(tmp_path / "cache"), n_test=8)
    params["model"]["pretrained"] = str(weights.parent)
    params["golden"].update(unit=7, per_round=1, n_train=6, batch_size=2, shard_size=2, chunk_tokens=4096)
    params["predictor"].update(epochs=2, batch_size=2)
    params["tune"].update(epochs=1, shots=1, batch_size=8)
    params["eval"].update(batch_size=8, sweep_keeps=[0.6, 1.0], sweep_images=6, overlay_images=2)
    params["check"]["max_drop"] = 1.0  # random weights: accuracies are noise, the gate's logic is tested elsewhere
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # Two processes: gloo on a CPU; on GPUs one per GPU, at most two (a 1-GPU box refuses CLIPPRUNE_NPROC=2).
    nproc = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "CLIPPRUNE_NPROC": str(nproc)}
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():  # dvc.yaml's own commands, in its order (the gate without git here)
        cmd = stage["cmd"].replace("python", sys.executable, 1).split()
        cmd += ["--no-against-git"] if name == "check" else []
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, f"{name}: {out.stderr[-3000:]}"

    assert sorted(os.listdir(tmp_path / "data" / "coop")) == ["dtd", "oxford_pets"]  # both staged from one root
    assert torch.equal(torch.load(tmp_path / "models" / "clip.pt")["state_dict"]["visual.proj"],
                       torch.load(weights)["visual.proj"])  # the .bin's weights, not a random init
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert set(metrics["datasets"]) == {f"coop/{n}" for n in DATASETS}
    assert all(set(rows) == set(params["eval"]["methods"]) for rows in metrics["datasets"].values())
    flops = json.loads((tmp_path / "reports" / "flops.json").read_text())["datasets"]["coop/OxfordPets"]
    assert flops["full"]["gflops"] == pytest.approx(17.56, rel=0.01)  # field notes: ViT-B/16 at 224
    assert flops["golden"]["gflops"] == pytest.approx(12.25, rel=0.01)  # keep 0.6 at L=3
    for row in ("random", "cls_attention", "tome"):
        assert flops[row]["gflops"] == pytest.approx(flops["predictor"]["gflops"], rel=0.01)
        assert flops[row]["gflops_fvcore"] == pytest.approx(flops[row]["gflops"], rel=0.01)
    assert json.loads((tmp_path / "reports" / "check.json").read_text())["passed"]
