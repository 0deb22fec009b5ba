import os

import pytest
import torch

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
