"""Shared memory for the loader's batches: reused slots in each worker, and the pickler that sends a batch.

Plumbing under loader.py: a learner can take it as "a worker builds a batch's big tensors in shared memory it
reuses, and the main process receives them without a copy". `shared_empty` is the one name a collate_fn uses.
"""
from __future__ import annotations

import io
import math
import pickle
from multiprocessing.reduction import ForkingPickler

import torch

# Tensors below this size travel inside the message: a shared-memory segment and a file descriptor
# per tiny token tensor cost more than copying its bytes (on 2 cores: 2 workers went from 1.48x to
# ~1.6x the 0-worker rate).
BY_VALUE_BYTES = 1 << 16


class Slots:
    """A worker's shared-memory storages, reused (a fresh segment per batch cost 8% of a 16-image
    batch at 336 px). The n-th `shared_empty` call of a task in slot s gets storage (s, n); the
    loader's `_Worker.free_slot` picks the slots."""

    def __init__(self):
        # (slot, n-th call) -> storage
        self.storages: dict[tuple[int, int], torch.UntypedStorage] = {}
        self.slot = -1
        self.calls = 0
        self.in_batch: set[int] = set()  # data pointers of the storages the current batch uses

    def start(self, slot: int) -> None:
        """A new task, built in `slot`."""
        self.slot = slot
        self.calls = 0
        self.in_batch = set()

    def empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        key = (self.slot, self.calls)
        self.calls += 1
        nbytes = math.prod(shape) * dtype.itemsize
        storage = self.storages.get(key)
        if storage is None or storage.nbytes() < nbytes:
            storage = torch.empty(max(nbytes, 1), dtype=torch.uint8).share_memory_().untyped_storage()
            self.storages[key] = storage
        self.in_batch.add(storage.data_ptr())
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


_slots: Slots | None = None  # set in a loader worker process (install); None elsewhere


def install() -> Slots:
    """Give this process (a loader worker) its slots: `shared_empty` builds in them from now on."""
    global _slots
    _slots = Slots()
    return _slots


def shared_empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised shared-memory tensor for a collate_fn to build a batch's big tensors in: in
    a loader worker, in one of its reused slots; elsewhere a fresh one. The main process receives it
    without a copy."""
    if _slots is not None:
        return _slots.empty(tuple(shape), dtype)
    return torch.empty(shape, dtype=dtype).share_memory_()


def _tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


class BatchPickler(ForkingPickler):
    """ForkingPickler with torch's "file_descriptor" strategy: a segment is unlinked at once and
    passed as an open descriptor, so nothing leaks in /dev/shm when a worker is killed. Small
    tensors go by value; a tensor in one of the worker's slots goes as a persistent id, so
    `BatchUnpickler` sees which slots the batch uses."""

    def persistent_id(self, obj):
        if not isinstance(obj, torch.Tensor) or _slots is None:
            return None
        storage = obj.untyped_storage()
        if storage.data_ptr() not in _slots.in_batch:
            return None
        return ("slot", storage, obj.dtype, tuple(obj.shape), obj.stride(), obj.storage_offset())

    def reducer_override(self, obj):
        small = isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.nbytes < BY_VALUE_BYTES
        if small and not obj.requires_grad:
            # Any dtype (bool, bf16) as its bytes.
            raw = obj.contiguous().reshape(-1).view(torch.uint8)
            return _tensor_from_bytes, (raw.numpy().tobytes(), obj.dtype, tuple(obj.shape))
        return NotImplemented


class BatchUnpickler(pickle.Unpickler):
    """Loads what `BatchPickler` wrote, keeping the slot storages the batch uses in `slot_storages`."""

    def __init__(self, payload: bytes):
        super().__init__(io.BytesIO(payload))
        self.slot_storages: list[torch.UntypedStorage] = []

    def persistent_load(self, pid):
        _, storage, dtype, shape, stride, offset = pid
        self.slot_storages.append(storage)
        return torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)
