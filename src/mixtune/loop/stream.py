"""The stream of training micro-batches: shuffled per epoch, endless over epochs, resumable at any micro-batch.

    for epoch, consumed, batch in micro_batch_stream(rows, 8, seed=0, epoch=0, start=0): ...
"""

from __future__ import annotations

from typing import Iterator

from ..data import iterate_batches, num_batches


def batches_per_epoch(rows: list, batch_size: int) -> int:
    """Micro-batches iterate_batches yields over one epoch of `rows` (the last one may be smaller)."""
    return num_batches(len(rows), batch_size)


def micro_batch_stream(rows: list, batch_size: int, seed: int, epoch: int, start: int
                       ) -> Iterator[tuple[int, int, dict]]:
    """Endless micro-batches over epochs, starting at micro-batch `start` of `epoch` (resume skips what was
    consumed). Yields (epoch, micro-batches consumed in that epoch after this one, batch)."""
    while True:
        n = 0
        for batch in iterate_batches(rows, batch_size, shuffle=True, seed=seed, epoch=epoch, start=start):
            start += 1
            n += 1
            yield epoch, start, batch
        if n == 0 and start == 0:
            raise ValueError(f"no training batches: {len(rows)} packed rows for "
                             f"train.per_device_train_batch_size {batch_size}")
        epoch, start = epoch + 1, 0


def label_tokens(batch: dict) -> int:
    """Label tokens the model's shifted cross-entropy counts: labels[:, 1:] != -100."""
    return int((batch["labels"][:, 1:] != -100).sum())
