"""The loader, with real worker processes: same batches for 0, 1 and 2 workers; every failure is loud and named.

Proves: batches (random parts included) are identical for 0, 1 and 2 workers (fork, and spawn) and in
the order asked, also when workers finish out of order, and a resumed loader (first_batch) continues the
same stream; num_workers=0 leaves the caller's random state alone; an exception in dataset[i] or
collate_fn arrives as SampleError naming the index, id, image path and the worker's traceback; a worker
that dies from SIGKILL (self-inflicted, or sent from outside), SIGBUS, SIGSEGV or exit() ends the load
within 30 s with WorkerDied naming the worker, pid, signal, sample and cause; a hung worker raises
WorkerTimeout naming the stuck sample; workers ignore SIGINT; Ctrl-C ends a loading script with one
KeyboardInterrupt; leaving the loop early, close() and garbage collection stop the workers. After each:
no worker process is left, and workers exit by themselves when their main process is SIGKILLed.
"""
import ctypes
import multiprocessing
import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from llava_min.loader import Loader, SampleError, WorkerDied, WorkerTimeout, shared_empty

ROOT = pathlib.Path(__file__).resolve().parent.parent
BATCHES = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13]]


class Toy:
    """Sixteen samples with a random part (to see the seeding); `fault` does something bad at sample `bad`."""

    def __init__(self, fault=None, bad=5, slow=()):
        self.fault, self.bad, self.slow = fault, bad, slow

    def __len__(self):
        return 16

    def describe(self, i):  # what the loader's messages name a sample by (LLaVADataset has it too)
        return f"sample {i} (id 'toy-{i}', image /data/images/img{i}.png)"

    def __getitem__(self, i):
        if i in self.slow:
            time.sleep(0.3)
        if i == self.bad:
            if self.fault == "raise":
                raise ValueError(f"cannot decode img{i}.png")
            if self.fault == "sleep":
                time.sleep(3600)
            if self.fault == "segfault":
                ctypes.string_at(0)
            if self.fault == "exit":
                os._exit(3)
            if self.fault in ("SIGKILL", "SIGBUS"):
                os.kill(os.getpid(), getattr(signal, self.fault))
                time.sleep(10)  # the signal is on its way
        noise = torch.rand(1).item() + random.random() + np.random.rand()  # every generator must be seeded
        return {"index": i, "x": torch.full((2,), float(i) + noise)}


def collate(samples):
    return {"x": torch.stack([s["x"] for s in samples]), "indices": [s["index"] for s in samples]}


def bad_collate(samples):
    raise RuntimeError("shapes differ")


def load(loader):
    with loader:
        return list(loader)


def living_children():
    """Pids of this process's children that are not zombies, from /proc; multiprocessing's resource
    tracker (started once by the spawn test, and living as long as this process) does not count."""
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue  # it ended while we looked
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"resource_tracker" not in command:
            found.append(int(stat.parent.name))
    return found


def assert_no_workers_left():
    assert multiprocessing.active_children() == []  # the children multiprocessing started and knows of
    assert living_children() == []


def run_until_error(loader, error_type):
    """Iterate to the error; return it and the seconds it took."""
    start = time.monotonic()
    with pytest.raises(error_type) as info:
        with loader:
            for _ in loader:
                pass
    return info.value, time.monotonic() - start


def test_same_batches_for_0_1_2_workers_in_order():
    # Sample 0 is slow, so with 2 workers the second batch is ready before the first one.
    runs = {n: load(Loader(Toy(slow=(0,)), BATCHES, collate, num_workers=n, seed=7)) for n in (0, 1, 2)}
    assert [b["indices"] for b in runs[0]] == BATCHES
    for n in (1, 2):
        assert len(runs[n]) == len(BATCHES)
        for a, b in zip(runs[0], runs[n]):
            assert a["indices"] == b["indices"]
            assert torch.equal(a["x"], b["x"]), f"{n} workers changed the random part"
    other_seed = load(Loader(Toy(), BATCHES, collate, num_workers=0, seed=8))
    assert not torch.equal(other_seed[0]["x"], runs[0][0]["x"])


class Images:
    """Samples with an 'image' whose size varies with the index, so a reused slot must grow."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        noise = torch.randint(0, 9, (1, 8), dtype=torch.uint8)  # seeded per batch: same for any worker count
        return {"index": i, "image": torch.full((1 + i % 5, 8), i, dtype=torch.uint8) + noise}


def shared_collate(samples):
    """Like data.collate(shared=True): the big tensor is built in shared_empty, i.e. a worker's reused slot."""
    images = [s["image"] for s in samples]
    rows = sum(len(x) for x in images)
    return {"image": torch.cat(images, out=shared_empty((rows, 8), torch.uint8)),
            "indices": [s["index"] for s in samples]}


def test_reused_shared_memory_never_overwrites_a_batch_still_held():
    # Keeping every batch: no slot can be reused, each batch keeps its own contents.
    batches = [list(range(i, min(i + 1 + i % 4, 64))) for i in range(0, 64, 3)]  # batch sizes vary too
    expected = load(Loader(Images(), batches, shared_collate, num_workers=0, seed=3))
    loader = Loader(Images(), batches, shared_collate, num_workers=2, seed=3, prefetch=2)
    kept = load(loader)
    for a, b in zip(expected, kept, strict=True):
        assert a["indices"] == b["indices"] and torch.equal(a["image"], b["image"])
        assert b["image"].is_shared()
    assert sum(loader.slots_made) == len(batches)
    # Dropping each batch after use, as a training loop does: a few slots per worker serve the whole pass.
    loader = Loader(Images(), batches, shared_collate, num_workers=2, seed=3, prefetch=2)
    with loader:
        for a, b in zip(expected, loader, strict=True):
            assert torch.equal(a["image"], b["image"])
            made = list(loader.slots_made)
    assert max(made) <= 2 + 2, made  # prefetch + the batch in use + the previous one, still bound to `b`


def test_spawn_start_method():
    # spawn pickles the data set, collate_fn and pipes into a fresh interpreter: same batches.
    main = load(Loader(Toy(), BATCHES[:2], collate, num_workers=0))
    spawned = load(Loader(Toy(), BATCHES[:2], collate, num_workers=1, start_method="spawn"))
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(main, spawned, strict=True))


def test_first_batch_resumes_the_same_stream():
    full = load(Loader(Toy(), BATCHES, collate, num_workers=2))
    resumed = load(Loader(Toy(), BATCHES[2:], collate, num_workers=2, first_batch=2))
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a["x"], b["x"])


def test_main_process_random_state_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load(Loader(Toy(), BATCHES, collate, num_workers=0))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exception_names_sample_with_traceback(num_workers):
    loader = Loader(Toy("raise", bad=5), BATCHES, collate, num_workers=num_workers)
    error, _ = run_until_error(loader, SampleError)
    message = str(error)
    assert error.index == 5 and error.batch_number == 1
    for part in ("sample 5 (id 'toy-5'", "image /data/images/img5.png", "ValueError: cannot decode img5.png",
                 "--num-workers 0"):
        assert part in message, (part, message)
    if num_workers:
        assert "Traceback in the worker" in message and "__getitem__" in message
        assert "loader worker 1" in message  # batch 1 went to worker 1
        assert_no_workers_left()
    else:
        assert isinstance(error.__cause__, ValueError)  # the original traceback is chained


def test_collate_failure_names_batch():
    error, _ = run_until_error(Loader(Toy(), BATCHES, bad_collate, num_workers=1), SampleError)
    assert "collate_fn for batch 0 (samples [0, 1, 2])" in str(error) and "shapes differ" in str(error)
    assert error.index is None
    assert_no_workers_left()


@pytest.mark.parametrize("fault, words", [
    ("SIGKILL", ["killed by SIGKILL", "out of memory", "--num-workers"]),
    ("SIGBUS", ["killed by SIGBUS", "/dev/shm", "--shm-size"]),
    ("segfault", ["killed by SIGSEGV", "native library", "--num-workers 0"]),
    ("exit", ["exited with code 3"]),
])
def test_dead_worker_is_named(fault, words):
    loader = Loader(Toy(fault, bad=7), BATCHES, collate, num_workers=2, timeout=60)
    error, seconds = run_until_error(loader, WorkerDied)
    message = str(error)
    assert seconds < 30
    # Batch 2 holds sample 7 and went to worker 0.
    assert "loader worker 0 (pid " in message, message
    assert "building sample 7 (id 'toy-7'" in message and "image /data/images/img7.png) of batch 2" in message
    for word in words:
        assert word in message, (word, message)
    assert error.index == 7 and error.batch_number == 2
    assert_no_workers_left()


def test_worker_killed_from_outside():
    loader = Loader(Toy(slow=range(16)), BATCHES, collate, num_workers=2, prefetch=1, timeout=60)
    start = time.monotonic()
    with pytest.raises(WorkerDied) as info:
        with loader:
            for i, _ in enumerate(loader):
                if i == 0:
                    pids = list(loader.worker_pids)
                    os.kill(pids[1], signal.SIGKILL)
    assert time.monotonic() - start < 30
    assert f"loader worker 1 (pid {pids[1]}) was killed by SIGKILL" in str(info.value)
    assert_no_workers_left()


def test_workers_ignore_sigint():
    # Ctrl-C reaches every process of the group; only the main process may act on it.
    loader = Loader(Toy(slow=range(16)), BATCHES, collate, num_workers=2, prefetch=1)
    with loader:
        for i, batch in enumerate(loader):
            if i == 0:
                for pid in loader.worker_pids:
                    os.kill(pid, signal.SIGINT)
    assert batch["indices"] == BATCHES[-1]


def test_hung_worker_times_out_naming_the_sample():
    loader = Loader(Toy("sleep", bad=4), BATCHES, collate, num_workers=2, timeout=2)
    error, seconds = run_until_error(loader, WorkerTimeout)
    message = str(error)
    assert seconds < 20
    assert "loader worker 1" in message and "sample 4 (id 'toy-4'" in message and "timeout 2 s" in message
    assert error.index == 4
    assert_no_workers_left()


def test_stopping_early_stops_workers():
    # Leaving the loop and dropping the iteration (garbage collection) stops the workers...
    loader = Loader(Toy(), BATCHES, collate, num_workers=2)
    for batch in loader:
        assert len(living_children()) == 2
        break
    del batch
    assert loader.worker_pids == []
    assert_no_workers_left()
    # ... and so does close() on a loader in the middle of an iteration.
    iteration = iter(loader)
    next(iteration)
    loader.close()
    assert_no_workers_left()
    with pytest.raises(StopIteration):
        next(iteration)


SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_loader import BATCHES, Toy, collate
    from llava_min.loader import Loader
    loader = Loader(Toy(slow=range(16)), BATCHES * 100, collate, num_workers=2)
    for i, batch in enumerate(loader):
        if i == 0:
            print(" ".join(map(str, loader.worker_pids)), flush=True)
""")


def start_script():
    """A loading script in its own process group; returns it and its workers' pids once it has a batch."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(tests=str(ROOT / "tests"))], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    if len(pids) != 2:
        proc.kill()
        pytest.fail(f"the script did not start its workers: {proc.communicate()[1]}")
    return proc, pids


def assert_gone(pids, within=5.0):
    """No process in `pids` is running (a zombie that nobody reaps is not running) within `within` s."""
    def running():
        alive = []
        for pid in pids:
            try:
                state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.append(pid)
        return alive

    deadline = time.monotonic() + within
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running() == [], f"workers {running()} outlived their main process"


def test_ctrl_c_exits_cleanly():
    # A terminal's Ctrl-C sends SIGINT to the whole process group: the main process and its workers.
    proc, pids = start_script()
    try:
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert stderr.count("Traceback") == 1 and "KeyboardInterrupt" in stderr, stderr
    assert_gone(pids, within=0.5)  # the script itself joined them before it exited


def test_workers_exit_when_the_main_process_is_killed():
    proc, pids = start_script()
    proc.kill()  # SIGKILL: no cleanup code runs in the main process
    proc.wait()
    assert_gone(pids)
