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


def device() -> str:
    """This process's device: its GPU under torchrun (LOCAL_RANK), else the only GPU, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def my_share(items: list) -> list:
    """Round-robin share of `items` for this process (all of them without torchrun). Each item is computed
    whole by one process, so results do not depend on the number of processes."""
    rank, world = rank_world()
    return items[rank::world]


def gather(items: list) -> list:
    """Every process's `items`, concatenated (rank order), on every process."""
    _, world = rank_world()
    if world == 1:
        return list(items)
    parts = [None] * world
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def barrier() -> None:
    if rank_world()[1] > 1:
        torch.distributed.barrier()


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
