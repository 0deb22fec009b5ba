"""Runs golden search on a tiny model and dataset; the golden tests start it as a process (torchrun, SIGKILL)."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_clip  # noqa: E402

from clipprune.dist import init_from_env, shutdown  # noqa: E402
from clipprune.golden import SearchConfig, run_search  # noqa: E402


class Images(torch.utils.data.Dataset):
    """Deterministic random images; optionally slow after `slow_from` so a test can kill the run midway."""

    def __init__(self, n: int, slow_from: int):
        self.x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        self.slow_from = slow_from

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i >= self.slow_from:
            time.sleep(0.3)
        return self.x[i], i % 3


if __name__ == "__main__":
    out, n, slow_from = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    init_from_env()
    model = tiny_clip()
    classifier = torch.nn.functional.normalize(torch.randn(32, 3, generator=torch.Generator().manual_seed(3)), dim=0)
    run_search(model=model, dataset=Images(n, slow_from), cfg=SearchConfig(layer=1, unit=1, per_round=4, budget=0.5, score="label"),
               out_path=out, meta={"model": "tiny", "dataset": "random"}, classifier=classifier,
               batch_size=2, shard_size=4, progress=False)
    shutdown()
