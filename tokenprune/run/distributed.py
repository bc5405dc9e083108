"""Data parallel within a node: ``torchrun --nproc_per_node=N -m tokenprune ...`` runs one process per rank.

Each rank loads its own copy of the model on its own device (``cuda:LOCAL_RANK``; the CPU without CUDA) and is
shard ``RANK`` of ``WORLD_SIZE`` of the run directory: its own results file, its own lock (``results.py``). The
ranks meet twice, through ``torch.distributed`` (gloo for the CPU tensors of these meetings; with CUDA the group
also carries nccl for the GPUs): after every rank has opened its results file, and after every rank has read all
the results files of the directory — so all of them shard the same list of samples still to run, and none writes
before all have read. At the end rank 0 waits for the others' locks, merges the shards and writes the summary.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from .results import Shard


def torchrun_ranks() -> tuple[int, int, int] | None:
    """``(rank, world size, local rank)`` when this process is one of several started by torchrun, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


@dataclass
class Group:
    """This process's place in a torchrun group."""

    rank: int
    world: int
    local_rank: int

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world)

    def barrier(self) -> None:
        """Wait for every rank (a CPU all-reduce: the gloo backend, whatever the model's device)."""
        torch.distributed.all_reduce(torch.zeros(1))

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (a small picklable object)."""
        holder = [value]
        torch.distributed.broadcast_object_list(holder, src=0, device=torch.device("cpu"))
        return holder[0]

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def start() -> Group | None:
    """Join the torchrun group (once per process); None outside torchrun (or with one process)."""
    ranks = torchrun_ranks()
    if ranks is None:
        return None
    rank, world, local_rank = ranks
    if not torch.distributed.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world,
                                             timeout=datetime.timedelta(minutes=30))
    return Group(rank, world, local_rank)


def rank_device(device: str, group: Group) -> str:
    """The device of this rank's model copy: ``cuda:LOCAL_RANK`` for ``model.device=auto`` or ``cuda`` with CUDA;
    ValueError for a fixed ``cuda:N`` (every rank would share one GPU) or a local rank beyond the visible GPUs."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if device not in ("auto", "cuda"):
        raise ValueError(f"model.device={device!r} under torchrun: each rank takes its own GPU (cuda:LOCAL_RANK); "
                         "give model.device=auto or cuda (or cpu)")
    if group.local_rank >= torch.cuda.device_count():
        raise ValueError(f"torchrun started local rank {group.local_rank} but only {torch.cuda.device_count()} GPUs "
                         "are visible; give --nproc_per_node at most the number of GPUs")
    return f"cuda:{group.local_rank}"
