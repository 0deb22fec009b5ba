import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before open_clip (and huggingface_hub) are imported
torch.set_num_threads(2)

from clipprune.methods import encode_pruned  # noqa: E402,F401  (re-exported for the tests)


def tiny_clip(*, image_size: int = 32, patch_size: int = 8, width: int = 64, layers: int = 4, heads: int = 2, seed: int = 0):
    """A random-init open_clip CLIP small enough for unit tests (grid = image_size / patch_size)."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=image_size, patch_size=patch_size, width=width, layers=layers, head_width=width // heads),
        text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1),
    ).eval()


ROOT = Path(__file__).resolve().parent.parent
STAGES = ("data", "pretrain", "golden", "predictor", "tune", "flops", "evaluate", "sweep", "report", "check")


def run_every_stage(params: dict, cwd: Path, *, n_ranked: int) -> None:
    """Shrink a profile's `params` to seconds (3 pretraining steps, `n_ranked` ranked train images, one tuning
    epoch), write them to cwd/params.yaml and run every DVC stage's command there in order, as dvc repro would
    (one process each; the gate without git). Fails with the stage's stderr."""
    params["pretrain"].update(steps=3, batch_size=8, warmup=1, threads=1)
    params["golden"].update(n_train=n_ranked, batch_size=2, shard_size=2)
    params["predictor"].update(epochs=2, batch_size=2)
    params["tune"].update(epochs=1, shots=1, batch_size=3)
    params["eval"].update(sweep_keeps=[0.6, 1.0], sweep_images=3, overlay_images=2)
    params["check"]["max_drop"] = 1.0  # a 3-step model: accuracies are noise, the gate's logic is tested elsewhere
    (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for stage in STAGES:
        args = ["--no-against-git"] if stage == "check" else []
        out = subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=cwd, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{stage}: {out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from a second thread; on a shared 2-core machine they lose ~10x to it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny():
    return tiny_clip()
