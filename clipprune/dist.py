"""torch.distributed in one place: started from torchrun's environment (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import os

import torch


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (no-op for a plain single process); returns (rank, world)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return rank_world()


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_world()[1] > 1:
        torch.distributed.barrier()


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
