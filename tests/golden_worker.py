"""Runs golden search on a tiny model and dataset; the golden tests start it as a process (torchrun, SIGKILL).

    python golden_worker.py OUT N_IMAGES [--slow-from I] [--record PATH] [--die-writing-from I]

--record: every image the search loads is appended to PATH.<rank> as "<rank> <index>", so a test sees which
process computed which image (and that a rerun did not recompute finished shards).
--die-writing-from I: once image I is loaded, any file write past 1 KiB kills this process in the middle of
that write (RLIMIT_FSIZE with SIGXFSZ's default action): a kill during the next shard's write, however
that write is coded.
"""
import argparse
import os
import resource
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_clip  # noqa: E402

from clipprune.dist import init_from_env, shutdown  # noqa: E402
from clipprune.golden import SearchConfig, run_search  # noqa: E402

LIMIT = 1024  # bytes: every shard file is larger (a torch zip of four rows), the log never gets there


class Images(torch.utils.data.Dataset):
    """Deterministic random images; optionally slow after `slow_from` so a test can kill the run midway."""

    def __init__(self, n: int, *, slow_from: int, log: str | None, die_writing_from: int):
        self.x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))
        self.slow_from, self.die_writing_from = slow_from, die_writing_from
        self.log = None if log is None else f"{log}.{os.environ.get('RANK', '0')}"

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{os.environ.get('RANK', '0')} {i}\n")
        if i == self.die_writing_from:
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it (writes would raise EFBIG instead)
            resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        if i >= self.slow_from:
            time.sleep(0.3)
        return self.x[i], i % 3


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("n", type=int)
    ap.add_argument("--slow-from", type=int, default=10**9)
    ap.add_argument("--record")
    ap.add_argument("--die-writing-from", type=int, default=-1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    init_from_env()
    model = tiny_clip()
    classifier = torch.nn.functional.normalize(torch.randn(32, 3, generator=torch.Generator().manual_seed(3)), dim=0)
    dataset = Images(a.n, slow_from=a.slow_from, log=a.record, die_writing_from=a.die_writing_from)
    run_search(model=model, dataset=dataset, cfg=SearchConfig(layer=1, unit=1, per_round=4, budget=0.5, score="label"),
               out_path=a.out, meta={"model": "tiny", "dataset": "random"}, classifier=classifier,
               batch_size=2, shard_size=4, progress=False)
    shutdown()
