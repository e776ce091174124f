"""Training batches from DataLoader workers, several batches per transfer.

Each tensor a worker hands to the training process costs a shared-memory segment, a file
descriptor passed over a socket and a mapping on the other side: about 0.6 ms of CPU per tensor
on this kind of machine, whatever its size. For small patches (a 16x64x64 batch of two is 0.8 MB)
that is a good part of the loader's cost, and on a CPU every millisecond the loader spends is
taken from the model. So a worker collates several batches into one transfer of up to
:data:`TRANSFER_BYTES`, and :class:`Batches` hands them out one batch at a time (slices along
the batch axis: no copy). Large patches are sent one batch per transfer, as usual.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset

from vesuvius_lab.core import children

#: The most bytes one transfer carries (unless a single batch is larger).
TRANSFER_BYTES = 4 << 20
#: The most batches one transfer carries.
MAX_BATCHES_PER_TRANSFER = 8


def batches_per_transfer(batch_size: int, window: Sequence[int], target_channels: int) -> int:
    """How many batches of float32 images and uint8 targets of ``window`` fit in one transfer."""
    batch_bytes = batch_size * math.prod(window) * (4 + target_channels)
    return max(1, min(MAX_BATCHES_PER_TRANSFER, TRANSFER_BYTES // batch_bytes))


class Batches:
    """An endless iterator of (image, targets) batches of ``batch_size`` from a stream of patches,
    made by ``workers`` DataLoader processes (none: in this process) that live as long as it does."""

    def __init__(self, stream: IterableDataset, batch_size: int, *, workers: int, per_transfer: int = 1,
                 pin_memory: bool = False):
        self.batch_size, self.per_transfer = batch_size, per_transfer
        # The workers end with this process, however it ends (see core/children.py).
        self.loader = iter(DataLoader(stream, batch_size=batch_size * per_transfer, num_workers=workers,
                                      pin_memory=pin_memory, worker_init_fn=children.loader_worker_init()))
        self._pending: Iterator[tuple[torch.Tensor, ...]] = iter(())

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        for batch in self._pending:
            return batch
        transfer = next(self.loader)
        self._pending = (tuple(tensor[start:start + self.batch_size] for tensor in transfer)
                         for start in range(0, len(transfer[0]), self.batch_size))
        return next(self._pending)

    @property
    def workers(self) -> list:
        """The DataLoader's worker processes (empty without workers)."""
        return list(getattr(self.loader, "_workers", []))

    @property
    def prefetched(self) -> int:
        """Batches the workers make ahead of use, at most (DataLoader's two transfers per worker)."""
        return 2 * len(self.workers) * self.per_transfer
