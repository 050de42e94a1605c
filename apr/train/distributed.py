"""Data parallelism: the process group torchrun asks for, and a mean across ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def local_main(self) -> bool:
        """The first process of its node: what each node's disk needs, it fetches."""
        return self.local_rank == 0


def setup():
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process needs no process group."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Distributed(rank, world, local), device


def all_reduce_mean(value: float, dist_info: Distributed) -> float:
    if dist_info.world == 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / dist_info.world


def barrier(dist_info: Distributed) -> None:
    """Wait for every rank (the main one fetching files the others then read)."""
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()
