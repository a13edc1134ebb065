"""Seeded, resumable, length-grouped batching (data-parallel aware)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length, in an order fixed by ``(seed, epoch)``.

    Indices are shuffled, cut into mega-batches of ``group_size`` batches, sorted by length inside each
    mega-batch (less padding), cut into batches, and the batches shuffled again. ``state_dict`` records
    the epoch and how many batches were handed out, so a resumed run continues with the very next batch.

    The order of the batches depends only on ``(lengths, batch_size, seed, epoch)``, never on the number
    of ranks: with ``num_replicas`` > 1 each rank takes every ``num_replicas``-th batch, so optimizer
    step ``k`` (``num_replicas * accumulation`` batches) always consumes batches
    ``[k * n, (k + 1) * n)`` of that one order, whatever the split of ``n`` into ranks and accumulation.
    An epoch is a whole number of such steps: the last ``< n`` batches are dropped.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 group_size: int = 50, drop_last: bool = False, num_replicas: int = 1, rank: int = 0,
                 accumulation: int = 1):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if accumulation < 1:
            raise ValueError("accumulation must be >= 1")
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.group_size, self.drop_last = group_size, drop_last
        self.num_replicas, self.rank, self.accumulation = num_replicas, rank, accumulation
        self.epoch = 0
        self._start = 0  # batches of the current epoch already consumed (set when resuming)

    def _all_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            order = list(range(n))
            batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        else:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
            mega = self.batch_size * self.group_size
            batches = []
            for s in range(0, n, mega):
                group = sorted(order[s : s + mega], key=lambda i: -self.lengths[i])
                batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        per_step = self.num_replicas * self.accumulation
        usable = len(batches) - len(batches) % per_step
        return batches[:usable][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        start, self._start = self._start, 0
        for k in range(start, len(batches)):
            self._yielded = k + 1
            yield batches[k]
        self.epoch += 1
        self._yielded = 0

    def __len__(self) -> int:
        return len(self._all_batches())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": getattr(self, "_yielded", 0), "seed": self.seed}

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Continue epoch ``epoch`` after ``batches_done`` batches (e.g. from the trainer's own progress
        counters, which are exact even when loader workers prefetch ahead)."""
        self.epoch, self._start = int(epoch), int(batches_done)

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"resuming with seed {self.seed}, but the checkpoint's data order used seed {state['seed']}")
        self.epoch, self._start = int(state["epoch"]), int(state["yielded"])
