"""The data loader: worker processes that build collated batches, every failure loud and named.

Start at `Loader._in_workers`, then `_receive` and `_worker_loop`. Batch b is built by `load_batch`
with generators seeded from (seed, b), in worker b % num_workers or in the main process: the same
batches either way.
"""
from __future__ import annotations

import faulthandler
import os
import random
import signal
import sys
import time
import traceback
import weakref
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing.connection import Connection, wait
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.multiprocessing as mp
from torch.multiprocessing.reductions import StorageWeakRef

from . import LlavaMinError, shm
from .shm import shared_empty  # noqa: F401 -- what a collate_fn builds in (data.collate, tests)

_POLL_S = 1.0   # how often the main process looks at the clock for timeouts while it waits
_JOIN_S = 2.0   # how long a stopping worker gets before the next, harsher signal


class LoaderError(RuntimeError):
    """The loader stopped; the message names the batch, the sample and what to do."""

    def __init__(self, message: str, batch_number: int | None = None, index: int | None = None):
        super().__init__(message)
        self.batch_number = batch_number  # which batch of the iteration (counted from first_batch)
        self.index = index                # the sample index, where one sample is to blame


class SampleError(LoaderError):
    """dataset[i] or collate_fn raised; the message holds the worker's traceback."""


class WorkerDied(LoaderError):
    """A worker process ended without being asked to (a signal, or an exit from native code)."""


class WorkerTimeout(LoaderError):
    """A worker produced nothing for `timeout` seconds while it had a batch to build."""


# What a signal that ended a worker most likely means, and what to do about it.
_DEATH_HINTS = {
    signal.SIGKILL: "the host ran out of memory and the kernel's OOM killer ended the worker (`dmesg | grep -i "
                    "oom` shows it), or someone ran kill -9. Fix: fewer --num-workers or a smaller --batch-size",
    signal.SIGBUS: "shared memory ran out: batches travel from workers through /dev/shm (64 MB in a container by "
                   "default). Fix: enlarge it (docker run --shm-size=8g) or use fewer --num-workers",
    signal.SIGSEGV: "a native library (an image decoder, numpy, torch) crashed in the worker; its Python stack is "
                    "printed above. Fix: run with --num-workers 0 to reproduce it with a traceback",
    signal.SIGABRT: "a native library aborted (its Python stack is printed above); --num-workers 0 reproduces it",
    signal.SIGTERM: "something outside the loader terminated the worker (a job scheduler, or a user)",
}


# The per-batch code: the same in a worker and, with num_workers=0, in the main process

def load_batch(dataset, collate_fn: Callable, seed: int, batch_number: int, indices: list[int], current) -> Any:
    """Reseed, build every sample, collate: randomness depends on the batch, never on the worker.
    `current.value` is the sample being built (-1 while collating), so a death or hang blames the
    right one."""
    s = int(np.random.SeedSequence([seed, batch_number]).generate_state(1)[0])  # 32 bits of a hash
    random.seed(s)
    np.random.seed(s)
    # CPU only: the main process's CUDA generators stay untouched
    torch.default_generator.manual_seed(s)
    samples = []
    for i in indices:
        current.value = i
        samples.append(dataset[i])
    current.value = -1
    return collate_fn(samples)


def _worker_loop(dataset, collate_fn: Callable, seed: int, tasks: Connection, results: Connection, current,
                 parent_pid: int) -> None:
    """A worker process: receive (batch number, indices, slot), send back (batch number, batch, failure).
    """
    # Ctrl-C reaches the whole process group: the main process decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A signal wake-up pipe inherited by fork is the main process's
    signal.set_wakeup_fd(-1)
    # N workers x all cores each would oversubscribe the CPU
    torch.set_num_threads(1)
    # SIGSEGV/SIGBUS/SIGABRT: print the Python stack, then die
    faulthandler.enable()
    # The main process asks this when we hang
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # Shared-memory slots this worker reuses for the batches' big tensors (shm.py).
    slots = shm.install()
    while True:
        if not tasks.poll(_POLL_S):
            if os.getppid() != parent_pid:
                return  # the main process is gone (killed): do not live on as an orphan
            continue
        try:
            task = tasks.recv()
        except EOFError:
            return
        if task is None:
            return
        number, indices, slot = task
        slots.start(slot)
        try:
            batch = load_batch(dataset, collate_fn, seed, number, indices, current)
            # Pickled here rather than inside send(), so that the main process can always read the
            # batch number, even when the tensors' shared memory cannot be fetched any more.
            results.send((number, bytes(shm.BatchPickler.dumps(batch)), None))
        except BaseException as e:  # noqa: BLE001 -- SystemExit from a library must be reported too
            try:  # the exception itself may not pickle: its text
                results.send((number, None, (current.value, f"{type(e).__name__}: {e}", traceback.format_exc())))
            except OSError:
                return  # the main process closed the pipe: it is stopping us anyway


def describe_sample(dataset, index: int) -> str:
    """The data set's own words for sample `index` (LLaVADataset.describe: id, file, image), else
    'sample 5'."""
    try:
        return dataset.describe(index)
    except Exception:  # noqa: BLE001 -- no describe(), or it failed: the message must still be written
        return f"sample {index}"


def _batch_text(number: int, indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:16]))
    if len(indices) > 16:
        shown += ", ..."
    return f"batch {number} (samples [{shown}])"


def _sample_error(dataset, where: str, number: int, indices: list[int], index: int, error: str,
                  worker_traceback: str | None = None) -> SampleError:
    """dataset[index] raised `error`, or collate_fn did (index -1)."""
    what = f"collate_fn for {_batch_text(number, indices)}"
    if index >= 0:
        what = f"{describe_sample(dataset, index)} of {_batch_text(number, indices)}"
    else:
        index = None
    message = (f"{where} failed on {what}: {error}\n"
               f"Run with --num-workers 0 to debug it in the main process (pdb and breakpoint() work there).")
    if worker_traceback:
        message += f"\n\nTraceback in the worker:\n{worker_traceback}"
    return SampleError(message, number, index)


# The loader

@dataclass
class _Worker:
    id: int
    process: Any
    tasks: Connection            # main -> worker: (batch number, indices, slot), or None to stop
    results: Connection          # worker -> main: (batch number, batch, failure)
    # Shared int: the sample index the worker is building, -1 otherwise
    current: Any
    name: str                    # "loader worker 0 (pid 123)", for messages
    # (number, indices, slot) sent and not answered, oldest first
    pending: deque = field(default_factory=deque)
    busy_since: float = 0.0      # when the worker last answered or got work while idle
    # Per slot (see shm.Slots): weak references to the storages of the batch last built in it, or None
    # while a task that uses it is pending. A slot whose references have all expired is free again.
    slots: list = field(default_factory=list)

    def free_slot(self) -> int:
        """A slot that no batch in flight or handed out uses any more (a new one if none is)."""
        for slot, refs in enumerate(self.slots):
            if refs is not None and all(ref.expired() for ref in refs):
                self.slots[slot] = None
                return slot
        self.slots.append(None)
        return len(self.slots) - 1

    def error(self, kind: type[LoaderError], dataset, what: str, then: str) -> LoaderError:
        """"<worker> <what> while <what it was doing><then>", naming the batch and sample it held.
        """
        if not self.pending:
            return kind(f"{self.name} {what} while idle{then}")
        number, indices, _ = self.pending[0]
        index = None
        doing = "collating or sending"
        if self.current.value >= 0:
            index = self.current.value
            doing = f"building {describe_sample(dataset, index)} of"
        return kind(f"{self.name} {what} while {doing} {_batch_text(number, indices)}{then}", number, index)


class Loader:
    """Collated batches of `dataset` for each list of indices in `batches`, in the order of `batches`.

    dataset      dataset[i] -> sample; a `dataset.describe(i)` lets errors name the sample's id,
    file and image batches      iterable of lists of sample indices, e.g.
    GlobalBatchSampler.batches_for_rank(...) num_workers  worker processes; 0 = in the main process
    (breakpoint() works; the first thing to try after a SIGSEGV) prefetch     batches in flight per
    worker: a bound on their memory timeout      seconds a worker may spend on one batch (None: no
    limit); the first includes its start-up start_method "fork", "spawn" or "forkserver" (None: the
    platform's); with spawn the data set must pickle first_batch  the number of the first batch,
    for the seeds: to resume at step k, k * grad_accum On any error, at the end of the data, on
    close(), on garbage collection and on Ctrl-C the workers stop.
    """

    def __init__(self, dataset, batches: Iterable[list[int]], collate_fn: Callable, num_workers: int = 0,
                 prefetch: int = 2, timeout: float | None = 600, pin_memory: bool = False,
                 start_method: str | None = None, seed: int = 0, first_batch: int = 0):
        if num_workers < 0 or prefetch < 1 or seed < 0 or (timeout is not None and timeout <= 0):
            raise LlavaMinError(f"Loader needs num_workers >= 0, prefetch >= 1, seed >= 0 and timeout > 0 or None; "
                                f"got {num_workers}, {prefetch}, {seed}, {timeout}")
        self.dataset = dataset
        self.batches = batches
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.timeout = timeout
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.context = mp.get_context(start_method)
        self.seed = seed
        self.first_batch = first_batch
        self._active = None               # weak reference to the running iteration
        self.worker_pids: list[int] = []  # of the running workers, for diagnostics
        # Shared-memory slots (shm.Slots) each running worker has made so far
        self.slots_made: list[int] = []

    def __len__(self) -> int:
        return len(self.batches)  # TypeError for a generator, as for any iterable without a length

    def __iter__(self) -> Iterator[Any]:
        self.close()  # one pass at a time: a new one stops the workers of an unfinished one
        if self.num_workers == 0:
            iteration = self._in_main()
        else:
            iteration = self._in_workers()
        # A weak reference: the iteration refers to the loader, so a strong one back would make a
        # cycle and delay the workers' shutdown to the cyclic garbage collector.
        self._active = weakref.ref(iteration)
        return iteration

    def close(self) -> None:
        """Stop the workers of the running iteration, if any (also done at its end, on error and on GC).
        """
        iteration = None
        if self._active is not None:
            iteration = self._active()
        if iteration is not None:
            iteration.close()  # raises GeneratorExit at its yield; its `finally` stops the workers

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _in_main(self) -> Iterator[Any]:
        current = SimpleNamespace(value=-1)
        for number, indices in enumerate(self.batches, start=self.first_batch):
            indices = list(indices)
            # load_batch reseeds the global generators; the training loop's own random state must
            # not move.
            states = random.getstate(), np.random.get_state(), torch.get_rng_state()
            try:
                batch = load_batch(self.dataset, self.collate_fn, self.seed, number, indices, current)
            except Exception as e:
                raise _sample_error(self.dataset, "the main process (num_workers=0)", number, indices, current.value,
                                    f"{type(e).__name__}: {e}") from e
            finally:
                random.setstate(states[0])
                np.random.set_state(states[1])
                torch.set_rng_state(states[2])
            yield _pin_memory(batch) if self.pin_memory else batch

    def _in_workers(self) -> Iterator[Any]:
        workers = self._start_workers()
        finished = False
        try:
            tasks = enumerate(self.batches, start=self.first_batch)
            in_flight = deque()  # batch numbers sent and not yet yielded, in order
            ready = {}           # batch number -> batch, for results that came before their turn
            while True:
                for number, indices in islice(tasks, self.prefetch * self.num_workers - len(in_flight)):
                    self._send(workers[(number - self.first_batch) % self.num_workers], number, list(indices))
                    in_flight.append(number)
                if not in_flight:
                    finished = True
                    return
                while in_flight[0] not in ready:
                    self._receive(workers, ready)
                batch = ready.pop(in_flight.popleft())
                yield _pin_memory(batch) if self.pin_memory else batch
        finally:
            self._stop_workers(workers, graceful=finished)

    def _start_workers(self) -> list[_Worker]:
        workers = []
        try:
            for i in range(self.num_workers):
                # Pipes, not multiprocessing.Queue: a Queue sends from a feeder thread, so a batch
                # that fails to pickle is lost with a printed traceback, and an exiting process
                # must first join that thread (a classic hang at shutdown). A pipe's send() happens
                # in the caller.
                task_out, task_in = self.context.Pipe(duplex=False)       # (reader, writer)
                result_out, result_in = self.context.Pipe(duplex=False)
                # One int64 in shared memory
                current = self.context.Value("q", -1, lock=False)
                process = self.context.Process(
                    target=_worker_loop, name=f"llava-min-loader-{i}", daemon=True,
                    args=(self.dataset, self.collate_fn, self.seed, task_out, result_in, current, os.getpid()))
                process.start()
                # Only the worker keeps its ends: when it dies, its result pipe reaches end-of-file
                # at once.
                task_out.close()
                result_in.close()
                workers.append(_Worker(i, process, task_in, result_out, current,
                                       f"loader worker {i} (pid {process.pid})"))
        except BaseException:
            self._stop_workers(workers, graceful=False)
            raise
        self.worker_pids = [w.process.pid for w in workers]
        self.slots_made = [0] * len(workers)
        return workers

    def _send(self, worker: _Worker, number: int, indices: list[int]) -> None:
        if not worker.pending:
            worker.busy_since = time.monotonic()
        slot = worker.free_slot()
        self.slots_made[worker.id] = len(worker.slots)
        worker.pending.append((number, indices, slot))
        try:
            worker.tasks.send((number, indices, slot))
        except OSError:
            worker.process.join(_JOIN_S)  # the worker is gone: report how it ended
            raise self._death_error(worker) from None

    def _receive(self, workers: list[_Worker], ready: dict) -> None:
        """Wait for one event: store a result, or raise for a failure, a death or a timeout."""
        # Every result pipe and every worker's sentinel (ready when the process ends): a death is
        # seen at once.
        by_handle = {handle: w for w in workers for handle in (w.results, w.process.sentinel)}
        poll = _POLL_S
        if self.timeout is not None:
            poll = min(_POLL_S, self.timeout)
        events = wait(list(by_handle), timeout=poll)
        for handle in events:
            w = by_handle[handle]
            if handle is w.results:
                self._take(w, ready)
            else:  # the sentinel: the process ended
                # Read what it sent before it died, so that `pending` names the batch it really
                # held.
                while w.results.poll():
                    self._take(w, ready)
                w.process.join(_JOIN_S)  # collect its exit code
                raise self._death_error(w)
        if not events and self.timeout is not None:
            now = time.monotonic()
            for w in workers:
                if w.pending and now - w.busy_since > self.timeout:
                    raise self._timeout_error(w, now - w.busy_since)

    def _take(self, w: _Worker, ready: dict) -> None:
        """Receive one message from `w`: keep the batch, or raise its failure."""
        try:
            number, payload, failure = w.results.recv()
            sent_number, indices, slot = w.pending.popleft()
            assert number == sent_number, (number, sent_number)  # each worker answers in order
            # Unpickling fetches each tensor's shared memory from the worker (file_descriptor
            # strategy): this fails if the worker has died since it sent the message.
            batch = None
            storages = []
            if failure is None:
                unpickler = shm.BatchUnpickler(payload)
                batch = unpickler.load()
                storages = unpickler.slot_storages
            # Free once the batch is dropped
            w.slots[slot] = [StorageWeakRef(storage) for storage in storages]
        except (EOFError, OSError, RuntimeError) as e:
            # End of file, or the tensors' owner is gone.
            w.process.join(_JOIN_S)
            if w.process.exitcode is None:
                raise LoaderError(
                    f"could not receive a batch from {w.name}: {type(e).__name__}: {e}. If this is 'Too many "
                    f"open files' or 'received 0 items of ancdata', raise the open-file limit (ulimit -n) or "
                    f"lower --num-workers", w.pending[0][0] if w.pending else None) from e
            raise self._death_error(w) from None
        w.busy_since = time.monotonic()
        if failure is not None:
            raise _sample_error(self.dataset, w.name, number, indices, *failure)
        ready[number] = batch

    def _death_error(self, w: _Worker) -> WorkerDied:
        code = w.process.exitcode
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:  # a real-time signal has no name
                how = f"was killed by signal {-code}"
            hint = _DEATH_HINTS.get(-code, "a signal from outside the loader")
        else:
            how = f"exited with code {code}"
            hint = "the data set or a library it calls ended the process (exit(), os._exit())"
        return w.error(WorkerDied, self.dataset, how, f".\nLikely cause: {hint}.")

    def _timeout_error(self, w: _Worker, waited: float) -> WorkerTimeout:
        with suppress(OSError):
            # Faulthandler in the worker prints its stack on stderr
            os.kill(w.process.pid, signal.SIGUSR1)
            time.sleep(0.5)                         # give it the moment it needs before we stop it
        return w.error(WorkerTimeout, self.dataset, f"sent nothing for {waited:.0f} s (timeout {self.timeout:g} s)",
                       "; its Python stack is printed above on stderr. A read from a slow or hung network file "
                       "system, or a deadlock in a library, are the usual causes. If samples really take this "
                       "long, raise --loader-timeout; the workers are now stopped.")

    def _stop_workers(self, workers: list[_Worker], graceful: bool) -> None:
        """End every worker: at the end of the data ask politely, otherwise SIGTERM; then SIGKILL; join all.
        """
        for w in workers:
            if not graceful:
                w.process.terminate()
                continue
            with suppress(OSError):  # a pipe whose worker is gone
                w.tasks.send(None)
        for w in workers:
            w.process.join(_JOIN_S)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(_JOIN_S)
            # Stuck in the kernel (a dead network mount): nothing more can be done
            if w.process.is_alive():
                print(f"llava-min loader: {w.name} did not exit after SIGKILL; it is left behind",
                      file=sys.stderr)
            w.tasks.close()
            w.results.close()
        self.worker_pids = []


def _pin_memory(obj):
    """Pinned copies of the tensors in nested dicts/lists/tuples; anything else as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.pin_memory()
    if isinstance(obj, dict):
        return {k: _pin_memory(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pin_memory(v) for v in obj)
    return obj
