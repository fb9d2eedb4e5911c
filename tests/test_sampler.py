"""GlobalBatchSampler: the data order depends on seed, epoch and global batch size only.

Proves: for world sizes 1, 2, 4 and grad accum 1, 2 the local batches of a step are exactly a
partition of that step's global batch (so every process count sees the same data); jumping to step
k builds only k's epoch and gives what iterating gives, also through batches_for_rank; an epoch
holds steps_per_epoch = floor(N / global batch) batches of distinct samples (all samples, with
repeats, for drop_last=False); the epoch's longest sample is in its first batch, first; batches
never mix images and text-only samples except one leftover batch; batches are length-sorted and
rank 0's first micro-batch is the longest; seeds and epochs change the order; an indivisible split
is an error that says what to do.
"""
import random

import pytest

from llava_min import LlavaMinError
from llava_min.sampler import GlobalBatchSampler


def lengths(n=203, seed=0):
    """Positive = with an image, negative = text-only (about a quarter)."""
    rng = random.Random(seed)
    return [rng.randint(10, 500) * (-1 if rng.random() < 0.25 else 1) for _ in range(n)]


LENGTHS = lengths()


@pytest.mark.parametrize("world_size, grad_accum", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2)])
def test_local_batches_partition_the_global_batch(world_size, grad_accum):
    sampler = GlobalBatchSampler(LENGTHS, 16, seed=3)
    reference = GlobalBatchSampler(LENGTHS, 16, seed=3)  # a separate process's own sampler
    for step in (0, 1, sampler.steps_per_epoch + 5):
        pieces = [sampler.local_batch(step, rank, world_size, micro, grad_accum)
                  for micro in range(grad_accum) for rank in range(world_size)]
        assert all(len(p) == 16 // (world_size * grad_accum) for p in pieces)
        assert sorted(sum(pieces, [])) == sorted(reference.global_batch(step))


def test_resume_jumps_without_replay(monkeypatch):
    sampler = GlobalBatchSampler(LENGTHS, 8, seed=1)
    spe = sampler.steps_per_epoch
    iterated = list(sampler.batches_for_rank(rank=1, world_size=2, grad_accum=2, stop_step=3 * spe))
    fresh = GlobalBatchSampler(LENGTHS, 8, seed=1)
    built = []
    original = fresh._build_epoch
    monkeypatch.setattr(fresh, "_build_epoch", lambda epoch: built.append(epoch) or original(epoch))
    start = 2 * spe + 3
    resumed = list(fresh.batches_for_rank(rank=1, world_size=2, grad_accum=2, start_step=start, stop_step=3 * spe))
    assert resumed == iterated[start * 2:]
    assert built == [2], "resuming replayed earlier epochs"
    assert fresh.global_batch(start) == sampler.global_batch(start)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_epoch_contents_and_longest_first(group_by_length):
    sampler = GlobalBatchSampler(LENGTHS, 16, seed=0, group_by_length=group_by_length)
    spe = sampler.steps_per_epoch
    assert spe == len(LENGTHS) // 16
    firsts = []
    for epoch in range(3):
        batches = [sampler.global_batch(epoch * spe + k) for k in range(spe)]
        flat = sum(batches, [])
        assert len(flat) == len(set(flat)) == spe * 16
        assert max(abs(LENGTHS[i]) for i in batches[0]) == max(abs(n) for n in LENGTHS)
        if group_by_length:
            assert abs(LENGTHS[batches[0][0]]) == max(abs(n) for n in LENGTHS)
        firsts.append(batches[1])
    assert firsts[0] != firsts[1] != firsts[2], "epochs repeat the same order"


def test_drop_last_false_covers_every_sample():
    sampler = GlobalBatchSampler(LENGTHS, 16, seed=0, drop_last=False)
    assert sampler.steps_per_epoch == -(-len(LENGTHS) // 16)
    flat = sum((sampler.global_batch(k) for k in range(sampler.steps_per_epoch)), [])
    assert len(flat) == sampler.steps_per_epoch * 16 and set(flat) == set(range(len(LENGTHS)))


def test_modalities_are_not_mixed_and_batches_are_sorted():
    sampler = GlobalBatchSampler(LENGTHS, 16, seed=5)
    mixed = 0
    for epoch in range(4):
        for k in range(sampler.steps_per_epoch):
            batch = sampler.global_batch(epoch * sampler.steps_per_epoch + k)
            sizes = [abs(LENGTHS[i]) for i in batch]
            assert sizes == sorted(sizes, reverse=True)
            kinds = {LENGTHS[i] > 0 for i in batch}
            if len(kinds) > 1:
                mixed += 1
                assert k in (0, sampler.steps_per_epoch - 1), "a mixed batch is the leftover one, last (or first)"
    assert mixed <= 4  # at most one per epoch
    # Both pools divide evenly: no leftovers, no mixed batch at all.
    even = [100] * 32 + [-50] * 16
    sampler = GlobalBatchSampler(even, 16)
    assert all(len({even[i] > 0 for i in sampler.global_batch(k)}) == 1 for k in range(3))


def test_rank0_first_micro_batch_is_longest_and_work_is_balanced():
    sampler = GlobalBatchSampler(LENGTHS, 16, seed=2)
    batch = sampler.global_batch(0)
    assert sampler.local_batch(0, 0, 2, 0, 2) == batch[:4]
    # Snake order: rank 0 gets pieces 0 and 3, rank 1 pieces 1 and 2.
    assert sampler.local_batch(0, 0, 2, 1, 2) == batch[12:16]
    assert sampler.local_batch(0, 1, 2, 1, 2) == batch[8:12]


def test_seed_changes_order_and_errors_say_what_to_do():
    a, b = GlobalBatchSampler(LENGTHS, 16, seed=0), GlobalBatchSampler(LENGTHS, 16, seed=1)
    assert a.global_batch(1) != b.global_batch(1)
    with pytest.raises(LlavaMinError, match=r"16 is not divisible by world size 3 x grad accum 1"):
        a.local_batch(0, 0, 3, 0, 1)
    with pytest.raises(LlavaMinError, match="fewer than one global batch"):
        GlobalBatchSampler(LENGTHS[:10], 16)
    with pytest.raises(LlavaMinError, match="sample 2 has length 0"):
        GlobalBatchSampler([5, 6, 0, 7], 2)
