"""Batching tokenized conversations: right padding, or packing several samples per row.

Two layouts for packed samples:

- rows (default): samples kept apart by a block-diagonal causal mask ``[B, 1, T, T]`` (True = attend)
  and position ids that restart at every sample; under SDPA this reproduces the unpacked logits exactly;
- documents (``flatten=True``): every sample of the batch in one row ``[1, N]`` without padding, position
  ids restarting at every sample and no mask: O(N) for the attention implementations of
  :mod:`chameleon_ft.model.attention` that find the documents from the position ids.

Samples are never split: a sample, and so every image span in it, lies inside one document.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chameleon_ft.errors import DataError
from chameleon_ft.model.loss import IGNORE_INDEX


class CollateError(DataError):
    """A row is longer than ``max_length`` (samples must be filtered or packed upstream)."""


def pack_by_length(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing bins of sample indices whose lengths sum to at most ``max_length``.

    Deterministic: ties keep index order. Samples longer than ``max_length`` are an error here;
    the data pipeline drops or raises on them by policy before packing.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise CollateError(f"sample {i} has {n} tokens, more than max_length={max_length}")
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(max_length - n)
    return bins


class PackedRows(torch.utils.data.Dataset):
    """A dataset of packed rows: item ``k`` is the list of samples in bin ``k``."""

    def __init__(self, samples, bins: list[list[int]]):
        self.samples, self.bins = samples, bins

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, k: int) -> list[dict]:
        return [self.samples[i] for i in self.bins[k]]


@dataclass
class ConversationCollator:
    """Collate samples (dicts with ``input_ids`` and ``labels``) or packed rows (lists of them).

    Returns ``input_ids``, ``labels`` (-100 on padding), ``position_ids``, ``attention_mask`` (``[B, T]``
    for plain rows, ``[B, 1, T, T]`` bool when any row holds several samples) and ``sample_index``
    (``[B, T]``, the sample each token belongs to, -1 on padding; numbered across the batch).

    ``flatten``: the documents layout instead -- one row ``[1, N]`` holding every sample of the batch,
    no padding and no ``attention_mask`` (the position ids restart at each sample).
    """

    pad_id: int
    max_length: int
    pad_to_multiple_of: int = 8
    flatten: bool = False

    def __call__(self, items: list[dict] | list[list[dict]]) -> dict[str, torch.Tensor]:
        rows = [item if isinstance(item, list) else [item] for item in items]
        lengths = [sum(len(s["input_ids"]) for s in row) for row in rows]
        for r, n in enumerate(lengths):
            if n > self.max_length:
                raise CollateError(f"batch row {r} has {n} tokens, more than max_length={self.max_length}")
        if self.flatten:
            return self._documents([s for row in rows for s in row])
        T = max(lengths)
        m = self.pad_to_multiple_of
        T = min(-(-T // m) * m, max(self.max_length, T)) if m else T
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        sample_index = torch.full((B, T), -1, dtype=torch.long)
        packed = any(len(row) > 1 for row in rows)
        mask4 = torch.zeros((B, 1, T, T), dtype=torch.bool) if packed else None
        causal = torch.ones((T, T), dtype=torch.bool).tril() if packed else None
        k = 0
        for r, row in enumerate(rows):
            pos = 0
            for s in row:
                n = len(s["input_ids"])
                if len(s["labels"]) != n:
                    raise CollateError(f"sample {k}: {n} input ids but {len(s['labels'])} labels")
                input_ids[r, pos : pos + n] = torch.as_tensor(s["input_ids"])
                labels[r, pos : pos + n] = torch.as_tensor(s["labels"])
                # A sample's first token would be "predicted" from the previous sample's last one.
                labels[r, pos] = IGNORE_INDEX
                position_ids[r, pos : pos + n] = torch.arange(n)
                sample_index[r, pos : pos + n] = k
                if packed:
                    mask4[r, 0, pos : pos + n, pos : pos + n] = causal[:n, :n]
                pos += n
                k += 1
            if packed:
                # Padding attends to itself only: a fully masked row would make SDPA return NaN.
                idx = torch.arange(pos, T)
                mask4[r, 0, idx, idx] = True
        attention_mask = mask4 if packed else (sample_index >= 0).long()
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "attention_mask": attention_mask,
            "sample_index": sample_index,
        }


    @staticmethod
    def _documents(samples: list[dict]) -> dict[str, torch.Tensor]:
        """One row ``[1, N]`` of ``samples`` back to back (the documents layout)."""
        ids, labels, positions, owner = [], [], [], []
        for k, s in enumerate(samples):
            n = len(s["input_ids"])
            if len(s["labels"]) != n:
                raise CollateError(f"sample {k}: {n} input ids but {len(s['labels'])} labels")
            ids.append(torch.as_tensor(s["input_ids"], dtype=torch.long))
            lab = torch.as_tensor(s["labels"], dtype=torch.long).clone()
            lab[0] = IGNORE_INDEX  # a sample's first token would be "predicted" from the previous sample's last one
            labels.append(lab)
            positions.append(torch.arange(n))
            owner.append(torch.full((n,), k, dtype=torch.long))
        return {
            "input_ids": torch.cat(ids)[None],
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions)[None],
            "sample_index": torch.cat(owner)[None],
        }


def per_sample_loss(token_ce: torch.Tensor, token_index: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per sample from :class:`LossSums` token losses and a batch's ``sample_index``.

    ``token_index`` indexes the shifted grid ``[B, T-1]`` (target at t+1 predicted from t).
    """
    owner = sample_index[:, 1:].reshape(-1)[token_index]
    n = int(sample_index.max()) + 1
    sums = torch.zeros(n, dtype=token_ce.dtype).index_add_(0, owner, token_ce)
    counts = torch.zeros(n, dtype=token_ce.dtype).index_add_(0, owner, torch.ones_like(token_ce))
    return sums / counts.clamp(min=1)
