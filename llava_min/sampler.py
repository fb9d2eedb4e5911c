"""Which samples each optimizer step sees: one global batch per step, the same on any number of processes.

The order is a pure function of (seed, epoch, global batch size). Neither the world size, the gradient
accumulation, nor the number of loader workers enters it: a run on 1 or 4 processes trains on the same
data in the same order, and a run resumed on another world size continues where the old one stopped.
Each process takes its own slice of the global batch (`local_batch`), so the union over all ranks and
micro-steps of one step is exactly `global_batch(step)`.

One epoch, with group_by_length=True (LLaVA's `group_by_modality_length`; llava/train/llava_trainer.py
`get_modality_length_grouped_indices`, and XTuner's `LengthGroupedSampler`):
  1. split the samples by modality: `lengths[i] > 0` has an image, `lengths[i] < 0` is text-only
     (LLaVA's `modality_length` convention); shuffle each pool with the epoch's generator;
  2. cut each pool into global batches; a global batch never mixes images and text-only samples, so a
     step's micro-batches are uniformly with or without images. The two pools' leftovers (each shorter
     than a batch) are joined into at most one mixed batch, placed last, as LLaVA does; what is still
     left (fewer than global_batch_size samples) is dropped this epoch (a different set each epoch);
  3. sort every batch by length, longest first, so the contiguous pieces that `local_batch` hands to one
     micro-batch hold similar lengths (less padding);
  4. shuffle the order of the single-modality batches, then move the batch that holds the epoch's longest
     sample to the front: if the longest sequence does not fit in memory, step 1 says so, not hour 10.
     (Each pool's longest sample is put at the head of its shuffled pool, so it is never the one dropped.)
With group_by_length=False: one shuffle of all samples cut into batches, modalities mixed, no sorting,
but still the longest-first batch.

drop_last=False keeps every sample: the last, short batch is filled up with the epoch's first samples
(repeats), because every global batch must split into equal micro-batches on every rank.

`global_batch(step)` takes a step counted over all epochs, so resuming at step k needs no replay: the
epoch's order is built once (O(N log N)) and cached, and any step of it is then an O(1) lookup.

With pack=N (--pack N), the units of a global batch are packs, planned rows of at most N positions by the
length estimates, and global_batch_size counts packs (batch x processes x accumulation rows per step). Each
epoch: shuffle all samples (modalities mixed: a pack is never padded, so grouping gains nothing); in windows of
PACK_WINDOW samples, longest first, put each sample into the fullest pack it still fits (best-fit decreasing:
a few percent of padding); shuffle the packs; cut them into steps, each step's packs fullest first, the step
holding the epoch's fullest pack first. The pack count varies a little by epoch; steps_per_epoch is epoch 0's,
and another epoch drops its surplus packs or repeats its first ones. `local_batch` hands a rank its packs'
samples; `data.collate_packed` lays them into rows by their real lengths.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from typing import Iterator, Sequence

import numpy as np

PACK_WINDOW = 4096    # samples packed together: larger fills packs better, smaller keeps the order more random


class GlobalBatchSampler:
    """Global batches of sample indices by step; see the module docstring for the order."""

    def __init__(self, lengths: Sequence[int], global_batch_size: int, seed: int = 0,
                 group_by_length: bool = True, drop_last: bool = True, pack: int = 0):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1:
            raise ValueError(f"lengths must be a flat list of per-sample lengths, got shape {self.lengths.shape}")
        if global_batch_size < 1:
            raise ValueError(f"global batch size must be at least 1, got {global_batch_size}")
        zero = np.flatnonzero(self.lengths == 0)
        if group_by_length and zero.size:
            raise ValueError(f"sample {int(zero[0])} has length 0 ({zero.size} samples in all): lengths must be "
                             f"positive for samples with an image and negative for text-only ones")
        n = len(self.lengths)
        self.seed, self.pack = seed, pack
        self._cached_epoch, self._cached_batches = None, None
        if pack:
            self.packs, self._packs_epoch = self._pack_epoch(0), 0   # steps_per_epoch: from epoch 0's pack count
            n = len(self.packs)
        if n < global_batch_size:
            raise ValueError(f"the data set has {n} {'packs' if pack else 'samples'}, fewer than one global batch "
                             f"of {global_batch_size}; lower --batch-size / --grad-accum or the number of "
                             "processes, or add data")
        self.global_batch_size = global_batch_size
        self.group_by_length = group_by_length
        self.drop_last = drop_last
        self.steps_per_epoch = n // global_batch_size if drop_last else -(-n // global_batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    # ----------------------------------------------------------------------------------------------
    # The global order

    def global_batch(self, step: int) -> list[int]:
        """The sample indices of optimizer step `step` (0-based, counted over all epochs)."""
        return self._samples(step, 0, self.global_batch_size)

    def _samples(self, step: int, start: int, stop: int) -> list[int]:
        """The samples of units start..stop-1 of a step's global batch (units: samples, or packs)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        units = self.epoch_batches(epoch)[within, start:stop].tolist()
        return [i for u in units for i in self.packs[u]] if self.pack else units

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """All global batches of one epoch, (steps_per_epoch, global_batch_size); cached for the last epoch.
        With packing, the entries index `self.packs`, the sample lists of the epoch's packs."""
        if self._cached_epoch != epoch:
            self._cached_batches = self._build_packed_epoch(epoch) if self.pack else self._build_epoch(epoch)
            self._cached_epoch = epoch
        return self._cached_batches

    def _pack_epoch(self, epoch: int) -> list[list[int]]:
        """One epoch's packs, in shuffled order: best-fit decreasing within windows of shuffled samples."""
        rng = np.random.default_rng((self.seed, epoch, 1))   # its own stream: the unpacked order is unchanged
        size = np.minimum(np.abs(self.lengths), self.pack)   # a sample is cut at --max-length <= N (train.py)
        order = rng.permutation(len(size))
        packs = []
        for w in range(0, len(order), PACK_WINDOW):
            window = order[w:w + PACK_WINDOW]
            free = []                                        # sorted (room left, pack) of this window's packs
            for i in window[np.argsort(-size[window], kind="stable")].tolist():
                n = int(size[i])
                at = bisect_left(free, (n, -1))              # the fullest pack with room for n
                if at < len(free):
                    room, p = free.pop(at)
                else:
                    room, p = self.pack, len(packs)
                    packs.append([])
                packs[p].append(i)
                insort(free, (room - n, p))
        return [packs[p] for p in rng.permutation(len(packs))]

    def _build_packed_epoch(self, epoch: int) -> np.ndarray:
        if self._packs_epoch != epoch:
            self.packs, self._packs_epoch = self._pack_epoch(epoch), epoch
        steps, size = self.steps_per_epoch, self.global_batch_size
        units = np.arange(steps * size) % len(self.packs)   # surplus packs dropped, or the first ones repeated
        length = np.minimum(np.abs(self.lengths), self.pack)
        total = np.array([length[p].sum() for p in self.packs])
        longest = np.array([length[p].max() for p in self.packs])
        fill = total * (self.pack + 1) + longest             # fullest first; among the fullest, the longest sample
        batches = units.reshape(steps, size)                 # (steps_per_epoch, packs per step)
        batches = np.take_along_axis(batches, np.argsort(-fill[batches], axis=1, kind="stable"), axis=1)
        first = int(np.argmax(fill[batches[:, 0]]))
        return np.concatenate([batches[first:first + 1], np.delete(batches, first, axis=0)])

    def _build_epoch(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, epoch))  # a seed sequence: no (seed, epoch) pairs collide
        size, length = self.global_batch_size, np.abs(self.lengths)
        if self.group_by_length:
            pools = [np.flatnonzero(self.lengths > 0), np.flatnonzero(self.lengths < 0)]  # image, text-only
        else:
            pools = [np.arange(len(self.lengths))]
        full, leftovers = [], []
        for pool in pools:
            pool = rng.permutation(pool)
            if pool.size:
                # Put the pool's longest sample first so it lands in a full batch, never among the dropped.
                longest = int(np.argmax(length[pool]))
                pool[[0, longest]] = pool[[longest, 0]]
            cut = pool.size - pool.size % size
            full.extend(pool[:cut].reshape(-1, size))   # (pool.size // size, size)
            leftovers.append(pool[cut:])
        rest = np.concatenate(leftovers)
        if not self.drop_last and rest.size % size:
            # Fill the short batch with the epoch's first samples (n >= size, so there are enough).
            rest = np.concatenate([rest, np.concatenate([*full, rest])[: size - rest.size % size]])
        tail = list(rest[: rest.size - rest.size % size].reshape(-1, size))  # the (at most one) mixed batch
        batches = [full[i] for i in rng.permutation(len(full))] + tail
        if self.group_by_length:
            # Longest first inside each batch (stable, so ties keep the shuffled order).
            batches = [b[np.argsort(-length[b], kind="stable")] for b in batches]
        first = int(np.argmax([length[b].max() for b in batches]))
        batches.insert(0, batches.pop(first))
        out = np.stack(batches)                       # (steps_per_epoch, global_batch_size)
        assert out.shape == (self.steps_per_epoch, size), out.shape
        return out

    # ----------------------------------------------------------------------------------------------
    # One process's share

    def local_batch(self, step: int, rank: int, world_size: int, micro_step: int, grad_accum: int) -> list[int]:
        """The micro-batch that `rank` runs at `micro_step` (0..grad_accum-1) of optimizer step `step`.

        The length-sorted global batch is cut into world_size * grad_accum contiguous pieces. Piece
        micro_step * world_size + r goes to rank r at that micro-step, ranks in reverse on odd
        micro-steps (a snake order), so every rank does about the same amount of work per optimizer
        step, and the longest piece is rank 0's first micro-batch.
        """
        pieces = world_size * grad_accum
        if self.global_batch_size % pieces:
            raise ValueError(f"global batch size {self.global_batch_size} is not divisible by world size "
                             f"{world_size} x grad accum {grad_accum} = {pieces}; make it "
                             f"micro-batch x processes x grad accum")
        if not (0 <= rank < world_size and 0 <= micro_step < grad_accum):
            raise ValueError(f"rank {rank} / micro-step {micro_step} out of range for world size {world_size} "
                             f"and grad accum {grad_accum}")
        micro = self.global_batch_size // pieces
        slot = rank if micro_step % 2 == 0 else world_size - 1 - rank
        piece = micro_step * world_size + slot
        return self._samples(step, piece * micro, (piece + 1) * micro)

    def batches_for_rank(self, rank: int = 0, world_size: int = 1, grad_accum: int = 1, start_step: int = 0,
                         stop_step: int | None = None) -> Iterator[list[int]]:
        """This rank's micro-batches for optimizer steps start_step .. stop_step-1 (None: endless), in order.

        Hand it to `Loader` with first_batch = start_step * grad_accum to resume at start_step.
        """
        step = start_step
        while stop_step is None or step < stop_step:
            for micro_step in range(grad_accum):
                yield self.local_batch(step, rank, world_size, micro_step, grad_accum)
            step += 1
