"""torch.distributed in one place: started from torchrun's environment (gloo on CPU, nccl on GPU).

How many processes a node runs is `nproc_per_node` (the machine's GPUs, else its usable CPU cores); which
device a process owns is `local_device` (its LOCAL_RANK's GPU). Both are pure so they are tested without a GPU.
"""
from __future__ import annotations

import os

import torch

from .errors import ClipPruneError

NPROC_ENV = "CLIPPRUNE_NPROC"  # processes per node, overriding the machine's count (stages.launch)


def nproc_per_node(*, n_gpus: int, n_cpus: int, override: str | None = None) -> int:
    """Processes per node: `override` (CLIPPRUNE_NPROC) if set, else one per GPU, else one per usable CPU core
    (torchrun gives each process one thread, so N processes keep N cores busy, as one process with N threads
    would). More processes than GPUs would put two NCCL ranks on one GPU: refused."""
    if override not in (None, ""):
        try:
            n = int(override)
        except ValueError:
            n = 0
        if n < 1:
            raise ClipPruneError(f"{NPROC_ENV}={override!r}: set it to a positive number of processes per node "
                                 f"(or unset it to use every GPU, else every CPU core)")
        if n_gpus and n > n_gpus:
            raise ClipPruneError(f"{NPROC_ENV}={n} but this machine shows {n_gpus} GPU(s): set it to at most {n_gpus} "
                                 "(one process per GPU)")
        return n
    return n_gpus if n_gpus else max(1, n_cpus)


def local_device(*, local_rank: int, n_gpus: int) -> str:
    """The device of the process with this LOCAL_RANK: its own GPU, or the CPU on a machine without one.
    A rank beyond the visible GPUs is an error, never a silent cuda:N that does not exist or a shared GPU."""
    if n_gpus == 0:
        return "cpu"
    if not 0 <= local_rank < n_gpus:
        raise ClipPruneError(f"LOCAL_RANK {local_rank} but {n_gpus} GPU(s) visible: start at most {n_gpus} "
                             f"process(es) per node (torchrun --nproc_per_node {n_gpus}, or {NPROC_ENV})")
    return f"cuda:{local_rank}"


def usable_cpus() -> int:
    """CPU cores this process may run on (respects taskset/cgroup cpusets, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def n_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (no-op for a plain single process); returns (rank, world).

    On GPUs each process first binds its own device (`device_id`): NCCL collectives otherwise guess cuda:0
    for every rank and a barrier can hang."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        dev = device()
        if dev.startswith("cuda"):
            torch.cuda.set_device(dev)
            torch.distributed.init_process_group("nccl", device_id=torch.device(dev))
        else:
            torch.distributed.init_process_group("gloo")
    return rank_world()


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def device() -> str:
    """This process's device: its GPU under torchrun (LOCAL_RANK), else the only GPU, else the CPU."""
    return local_device(local_rank=int(os.environ.get("LOCAL_RANK", "0")), n_gpus=n_gpus())


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
