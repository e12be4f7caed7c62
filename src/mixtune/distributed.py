"""Data-parallel training under torchrun: the same `mixtune train` command on N processes (one GPU each).

    torchrun --nproc_per_node 8 -m mixtune train configs/mixtral-8x7b-qlora.yaml

Every rank holds the whole 4-bit model and its own copy of the adapter. An optimizer step takes
`gradient_accumulation_steps × world_size` micro-batches from the one deterministic stream that a single
process would read; rank r runs micro-batches r, r + N, r + 2N, … of them. Each rank normalises its loss by the
label tokens of the *whole* step (every rank can count them: the rows are in memory), and the LoRA gradients
are summed across ranks. The update is therefore the one a single process makes with N times the
accumulation, up to summation order. Evaluation shards the eval rows and sums token losses. Rank 0 alone writes
files (config, metrics, checkpoints, adapter, report, merge) and prints. Every rank restores a checkpoint on
resume. LoRA dropout masks come from a generator seeded by (seed, step, rank), so a resumed run draws the
masks that an uninterrupted run would.

Backends: NCCL when the ranks train on CUDA devices (rank r uses cuda:LOCAL_RANK), gloo on CPU (CI tests).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterable

import torch
import torch.distributed as tdist


class Dist:
    """This process's place in the job: world size 1 and rank 0 when not launched by torchrun."""

    def __init__(self, world: int = 1, rank: int = 0, local_rank: int = 0, device: torch.device | None = None):
        self.world, self.rank, self.local_rank = world, rank, local_rank
        self.device = device or torch.device("cpu")  # where collectives' tensors live
        self.sharded = False  # train.distributed fsdp: the model is FSDP2-sharded (gradients reduced by FSDP)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the body first (e.g. fills a cache); the others run it after rank 0 is done."""
        if self.enabled and not self.is_main:
            tdist.barrier()
        yield
        if self.enabled and self.is_main:
            tdist.barrier()

    def sum(self, *values: float) -> list[float]:
        """Sums of these numbers over all ranks (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def sum_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's .grad over all ranks, in place (a missing grad counts as zeros)."""
        if not self.enabled:
            return
        works = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            works.append(tdist.all_reduce(p.grad, async_op=True))
        for w in works:
            w.wait()

    def close(self) -> None:
        if self.enabled and tdist.is_initialized():
            tdist.barrier()
            tdist.destroy_process_group()


def world_from_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) otherwise."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device, timeout_s: int = 3600) -> tuple[Dist, torch.device]:
    """Join the torchrun job if there is one. Returns the Dist and this rank's compute device: with CUDA,
    cuda:LOCAL_RANK (unless the config named an explicit index). timeout_s bounds every collective's wait
    (`train.ddp_timeout`)."""
    world, rank, local_rank = world_from_env()
    if world <= 1:
        return Dist(), device
    if device.type == "cuda":
        if device.index not in (None, local_rank):
            from .config import ConfigError
            raise ConfigError(f"model.device: {device} under torchrun; leave it auto (or cuda): rank {rank} uses "
                              f"cuda:LOCAL_RANK = cuda:{local_rank}")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not tdist.is_initialized():
        kw = {"device_id": device} if backend == "nccl" else {}
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return Dist(world, rank, local_rank, device if backend == "nccl" else torch.device("cpu")), device


def step_generator_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the RNG that draws rank `rank`'s dropout masks at optimizer step `step`."""
    return (seed * 1_000_003 + step * 10_007 + rank) % (2**63 - 1)
