"""Data-parallel training (DDP) without changing a number the method produces.

Started by `torchrun --nproc_per_node=N -m mlbreg train ...` (WORLD_SIZE/RANK set) or
`distributed=true`. Every rank builds the same model, method and loader from the same
seed and draws the same *global* batch; each rank trains on its slice, and DDP averages
the gradients. The loss of a slice is weighted by its share of the global batch, so the
averaged gradient is exactly the gradient of the global batch's mean loss, even for a
last batch that does not split evenly. Identical gradients + identical state = identical
optimizer updates, ML LinBreg supports and RigL masks on every rank, with no broadcast.
Only rank 0 writes files.

Note: BatchNorm statistics are per rank (as in plain DDP); models without BatchNorm (or
with `sync_batchnorm=true` on CUDA) match one process with the global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, x: torch.Tensor, y: torch.Tensor):
        """This rank's contiguous slice of the global batch and its loss weight."""
        if not self.enabled:
            return x, y, 1.0
        n = y.shape[0]
        bounds = [n * r // self.world for r in range(self.world + 1)]
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        return x[lo:hi], y[lo:hi], (hi - lo) * self.world / n

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool, device) -> bool:
        """True on every rank if it is true on any (used for stop requests)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init(requested: bool, device: torch.device) -> Context:
    """Join the process group torchrun set up (env:// rendezvous)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not requested:
        return Context()
    if world <= 1:
        raise ValueError(
            "distributed=true needs a launcher that sets WORLD_SIZE/RANK, e.g. torchrun --nproc_per_node=2 -m mlbreg train ..."
        )
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank=dist.get_rank(), world=dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """One GPU per rank: LOCAL_RANK picks it."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        index = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device
