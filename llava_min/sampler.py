"""Which samples each optimizer step sees: one global batch per step, the same on any number of
processes.

The order is a pure function of (seed, epoch, global batch size), not of the world size, the
gradient accumulation or the loader workers: 1 or 4 processes train on the same data in the same
order, and a resumed run may change its world size. Each rank takes its slice of a step's batch
(`local_batch`). `global_batch(step)` counts steps over all epochs, so resuming needs no replay: an
epoch's order is built once (O(N log N)), cached, then looked up.

One epoch, with group_by_length=True (LLaVA's `get_modality_length_grouped_indices`, XTuner's
LengthGroupedSampler):
  1. shuffle the samples with images (lengths > 0) and the text-only ones (< 0) as two pools, each
     pool's longest sample put first so that it is never dropped;
  2. cut each pool into global batches: a step is all with or all without images. The two
     leftovers make at most one mixed batch, placed last, as in LLaVA; what is still left is
     dropped this epoch;
  3. sort every batch longest first, so each micro-batch (a contiguous piece) holds similar
     lengths: less padding;
  4. shuffle the single-modality batches, then move the one with the epoch's longest sample to the
     front: if it does not fit in memory, step 1 says so, not hour 10.
With group_by_length=False: one shuffle of all samples, no sorting, still the longest-first batch.
drop_last=False fills the last batch up with the epoch's first samples: every global batch must
split evenly over the ranks. A length counts every image of its sample (data.estimate_length).

With pack=N (--pack N), the units of a batch are packs, rows of at most N positions by the length
estimates, and global_batch_size counts packs. Each epoch: shuffle all samples (a pack is never
padded: no grouping by modality); in windows of PACK_WINDOW, longest first, put each into the
fullest pack it still fits (best-fit decreasing); shuffle the packs; cut them into steps, each
step's packs fullest first, the step with the epoch's fullest pack first. steps_per_epoch is epoch
0's; another epoch drops its surplus packs or repeats its first ones.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from itertools import count
from typing import Iterator, Sequence

import numpy as np

from . import LlavaMinError

# Samples packed together: larger fills packs better, smaller keeps the order more random
PACK_WINDOW = 4096


class GlobalBatchSampler:
    """Global batches of sample indices by step; see the module docstring for the order."""

    def __init__(self, lengths: Sequence[int], global_batch_size: int, seed: int = 0,
                 group_by_length: bool = True, drop_last: bool = True, pack: int = 0):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1:
            raise LlavaMinError(f"lengths must be a flat list of per-sample lengths, got shape {self.lengths.shape}")
        if global_batch_size < 1:
            raise LlavaMinError(f"global batch size must be at least 1, got {global_batch_size}")
        zero = np.flatnonzero(self.lengths == 0)
        if group_by_length and zero.size:
            raise LlavaMinError(f"sample {int(zero[0])} has length 0 ({zero.size} samples in all): lengths must be "
                                f"positive for samples with an image and negative for text-only ones")
        n = len(self.lengths)
        units = "samples"
        self.seed = seed
        self.pack = pack
        self._cached_epoch = None
        self._cached_batches = None
        if pack:
            # A sample is cut at --max-length <= N (train.py); its estimate counts every image.
            self._sizes = np.minimum(np.abs(self.lengths), pack)
            # steps_per_epoch comes from epoch 0's pack count.
            self.packs = self._pack_epoch(0)
            self._packs_epoch = 0
            n = len(self.packs)
            units = "packs"
        if n < global_batch_size:
            raise LlavaMinError(f"the data set has {n} {units}, fewer than one global batch of "
                                f"{global_batch_size}; lower --batch-size / --grad-accum or the number of "
                                "processes, or add data")
        self.global_batch_size = global_batch_size
        self.group_by_length = group_by_length
        self.drop_last = drop_last
        # Without drop_last, the last short batch counts (it is filled up).
        self.steps_per_epoch = -(-n // global_batch_size)
        if drop_last:
            self.steps_per_epoch = n // global_batch_size

    def __len__(self) -> int:
        return self.steps_per_epoch

    def global_batch(self, step: int) -> list[int]:
        """The sample indices of optimizer step `step` (0-based, counted over all epochs)."""
        return self._samples(step, 0, self.global_batch_size)

    def _samples(self, step: int, start: int, stop: int) -> list[int]:
        """The samples of units start..stop-1 of a step's global batch (units: samples, or packs).
        """
        if step < 0:
            raise LlavaMinError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        units = self.epoch_batches(epoch)[within, start:stop].tolist()
        if self.pack:
            return [i for u in units for i in self.packs[u]]
        return units

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """All global batches of one epoch, (steps_per_epoch, global_batch_size); cached for the last epoch.
        With packing, the entries index `self.packs`, the sample lists of the epoch's packs."""
        if self._cached_epoch != epoch:
            if self.pack:
                self._cached_batches = self._build_packed_epoch(epoch)
            else:
                self._cached_batches = self._build_epoch(epoch)
            self._cached_epoch = epoch
        return self._cached_batches

    def _pack_epoch(self, epoch: int) -> list[list[int]]:
        """One epoch's packs, in shuffled order: best-fit decreasing within windows of shuffled samples.
        """
        # Its own stream: the unpacked order is unchanged
        rng = np.random.default_rng((self.seed, epoch, 1))
        order = rng.permutation(len(self._sizes))
        packs = []
        for w in range(0, len(order), PACK_WINDOW):
            window = order[w:w + PACK_WINDOW]
            # Sorted (room left, pack) of this window's packs
            free = []
            for i in window[np.argsort(-self._sizes[window], kind="stable")].tolist():
                n = int(self._sizes[i])
                at = bisect_left(free, (n, -1))              # the fullest pack with room for n
                if at < len(free):
                    room, p = free.pop(at)
                else:
                    room = self.pack
                    p = len(packs)
                    packs.append([])
                packs[p].append(i)
                insort(free, (room - n, p))
        return [packs[p] for p in rng.permutation(len(packs))]

    def _build_packed_epoch(self, epoch: int) -> np.ndarray:
        if self._packs_epoch != epoch:
            self.packs = self._pack_epoch(epoch)
            self._packs_epoch = epoch
        steps = self.steps_per_epoch
        size = self.global_batch_size
        # Surplus packs dropped, or the first ones repeated
        units = np.arange(steps * size) % len(self.packs)
        total = np.array([self._sizes[p].sum() for p in self.packs])
        longest = np.array([self._sizes[p].max() for p in self.packs])
        # Fullest first; among the fullest, the longest sample
        fill = total * (self.pack + 1) + longest
        batches = units.reshape(steps, size)                 # (steps_per_epoch, packs per step)
        batches = np.take_along_axis(batches, np.argsort(-fill[batches], axis=1, kind="stable"), axis=1)
        first = int(np.argmax(fill[batches[:, 0]]))
        return np.concatenate([batches[first:first + 1], np.delete(batches, first, axis=0)])

    def _build_epoch(self, epoch: int) -> np.ndarray:
        # A seed sequence: no (seed, epoch) pairs collide
        rng = np.random.default_rng((self.seed, epoch))
        size = self.global_batch_size
        length = np.abs(self.lengths)
        # [with images, text-only], or one pool of all
        pools = [np.arange(len(self.lengths))]
        if self.group_by_length:
            pools = [np.flatnonzero(self.lengths > 0), np.flatnonzero(self.lengths < 0)]
        full = []
        leftovers = []
        for pool in pools:
            pool = rng.permutation(pool)
            if pool.size:
                # Put the pool's longest sample first so it lands in a full batch, never among the
                # dropped.
                longest = int(np.argmax(length[pool]))
                pool[[0, longest]] = pool[[longest, 0]]
            cut = pool.size - pool.size % size
            full.extend(pool[:cut].reshape(-1, size))   # (pool.size // size, size)
            leftovers.append(pool[cut:])
        rest = np.concatenate(leftovers)
        if not self.drop_last and rest.size % size:
            # Fill the short batch with the epoch's first samples (n >= size, so there are enough).
            rest = np.concatenate([rest, np.concatenate([*full, rest])[: size - rest.size % size]])
        # The (at most one) mixed batch
        tail = list(rest[: rest.size - rest.size % size].reshape(-1, size))
        batches = [full[i] for i in rng.permutation(len(full))] + tail
        if self.group_by_length:
            # Longest first inside each batch (stable, so ties keep the shuffled order).
            batches = [b[np.argsort(-length[b], kind="stable")] for b in batches]
        first = int(np.argmax([length[b].max() for b in batches]))
        batches.insert(0, batches.pop(first))
        out = np.stack(batches)                       # (steps_per_epoch, global_batch_size)
        assert out.shape == (self.steps_per_epoch, size), out.shape
        return out

    def local_batch(self, step: int, rank: int, world_size: int, micro_step: int, grad_accum: int) -> list[int]:
        """The micro-batch that `rank` runs at `micro_step` (0..grad_accum-1) of optimizer step
        `step`: piece micro_step * world_size + r of world_size * grad_accum contiguous ones goes
        to rank r, ranks reversed on odd micro-steps, so ranks share the work evenly and the
        longest piece is rank 0's first micro-batch."""
        pieces = world_size * grad_accum
        if self.global_batch_size % pieces:
            raise LlavaMinError(f"global batch size {self.global_batch_size} is not divisible by world "
                                f"size {world_size} x grad accum {grad_accum} = {pieces}; make it "
                                f"micro-batch x processes x grad accum")
        if not (0 <= rank < world_size and 0 <= micro_step < grad_accum):
            raise LlavaMinError(f"rank {rank} / micro-step {micro_step} out of range for world size "
                                f"{world_size} and grad accum {grad_accum}")
        micro = self.global_batch_size // pieces
        slot = rank
        if micro_step % 2:
            slot = world_size - 1 - rank
        piece = micro_step * world_size + slot
        return self._samples(step, piece * micro, (piece + 1) * micro)

    def batches_for_rank(self, rank: int = 0, world_size: int = 1, grad_accum: int = 1, start_step: int = 0,
                         stop_step: int | None = None) -> Iterator[list[int]]:
        """This rank's micro-batches for steps start_step .. stop_step-1 (None: endless), in order;
        for `Loader`, with first_batch = start_step * grad_accum."""
        steps = count(start_step)
        if stop_step is not None:
            steps = range(start_step, stop_step)
        for step in steps:
            for micro_step in range(grad_accum):
                yield self.local_batch(step, rank, world_size, micro_step, grad_accum)
