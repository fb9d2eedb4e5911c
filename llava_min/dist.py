"""Distributed set-up: one process or `torchrun`, and collectives that explain themselves when they hang.

    d = dist.setup(timeout_s=args.dist_timeout, out_dir=out)   # torchrun's env, or one process without it
    d.print0("configuration ...")                             # rank 0 only
    d.log("loaded 1000 samples")                              # "[rank 1] loaded 1000 samples"
    dist.check_consistent(d, {"samples": len(ds), "max_steps": n, "config_hash": dist.config_hash(vars(args))})
    for step in ...:
        d.heartbeat(step, "forward")
        dist.all_reduce(d, loss_sum, what=f"loss sum at step {step}")
        with dist.collective(d, f"DDP gradient all-reduce at step {step}"):
            loss.backward()                                   # DDP's own collectives, named the same way
    dist.teardown(d)

Backends: NCCL with the rank's GPU bound at init (`device_id=`) when CUDA is available, gloo otherwise.
A second, gloo, process group carries object collectives and barriers (they never touch the GPU). The
timeout (`--dist-timeout`) is the default of both groups and is also passed to every wait, so nothing waits
for torch's default of 10-30 minutes. On NCCL, `TORCH_NCCL_BLOCKING_WAIT=1` makes a stuck collective raise
in the waiting thread (where it can be named) and `TORCH_NCCL_ASYNC_ERROR_HANDLING=1` tears the process
down for the ones nobody waits on; both are only defaults, an exported value wins.

What a hang leaves behind, with `out_dir` given (files under OUT):

  heartbeats/rank-N.json  {"rank", "step", "phase", "time", "alive", "pid", "host"}: where rank N was last
                          seen ("time") and when its process last showed life ("alive"). Written atomically,
                          at most once a second from the training thread; a background thread flushes the
                          latest state and refreshes "alive" every second, so a rank stuck in Python code looks
                          alive and a stopped or frozen process does not. Costs nothing per step.
  stacks/rank-N.txt       every thread's Python stack of rank N (traceback, then faulthandler's dump).
  stacks/request.json     a request for every rank to write its stacks; each rank's watcher thread polls it
                          twice a second.

A collective that times out or fails raises `DistTimeout` naming the collective, the step, the timeout and
every rank's last heartbeat; before raising, the rank writes its own stacks and requests everyone else's,
and waits up to a few seconds for them. `kill -USR1 <pid>` on any rank does the same without stopping
anything: the signal's C-level handler wakes the watcher thread through `signal.set_wakeup_fd`, which works
even while the main thread is blocked inside a collective, and the watcher writes the request. Ranks on other
nodes see the request only if OUT is on a shared file system. Without `out_dir`, SIGUSR1 prints this rank's
stacks to stderr (faulthandler) and timeouts name the collective without the other ranks' whereabouts.
"""
from __future__ import annotations

import datetime
import faulthandler
import hashlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist

from .weights import write_json

HEARTBEAT_EVERY_S = 1.0   # at most one heartbeat file write per second from the training thread
POLL_S = 0.5              # how often the watcher thread flushes heartbeats and looks for stack requests
ALIVE_EVERY_S = 1.0       # the watcher rewrites the heartbeat at least this often: "alive" = process not frozen
STACK_WAIT_S = 3.0        # how long a failing rank waits for the other live ranks' stacks before raising

# Substrings of the errors gloo and NCCL raise when a peer is slow, gone or broken (they raise plain
# RuntimeError or torch.distributed.DistError subclasses, depending on backend and version).
DIST_ERROR_HINTS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                    "gloo", "nccl", "processgroup", "peer")


class DistTimeout(RuntimeError):
    """A collective did not complete: it timed out, or a peer failed during it. The message names the
    collective, the step, the timeout and where every rank was last seen."""


class RankMismatch(ValueError):
    """The ranks disagree at start-up on something that must be identical (data size, steps, config)."""


@dataclass
class Dist:
    """This process's place in the job. One process: rank 0 of 1, no process group."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None        # "nccl" or "gloo"; None without a process group
    timeout_s: float = 600.0
    out_dir: Path | None = None
    cpu_group: object = None          # gloo group for barriers and object collectives
    step: int = 0                     # the last step given to heartbeat()
    phase: str = "start"              # what this rank was doing at its last heartbeat
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _beat_time: float = 0.0
    _written: float = 0.0             # monotonic time of the last heartbeat file write
    _dirty: bool = False
    _last_request: str = ""
    _watcher: threading.Thread | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _wakeup: tuple | None = field(default=None, repr=False)  # (read fd, write fd, old handler, old wakeup fd)
    _failed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    def print0(self, *args, **kwargs) -> None:
        """print on rank 0 only."""
        if self.rank == 0:
            print(*args, **kwargs, flush=True)

    def log(self, msg: str) -> None:
        """print on every rank, prefixed "[rank N]" when there is more than one."""
        prefix = f"[rank {self.rank}] " if self.world_size > 1 else ""
        print("\n".join(prefix + line for line in str(msg).splitlines() or [""]), flush=True)

    # ---- heartbeats -----------------------------------------------------------------------------

    def heartbeat(self, step: int | None = None, phase: str | None = None) -> None:
        """Record where this rank is. Cheap: the file is rewritten at most once per HEARTBEAT_EVERY_S here,
        and the watcher thread writes the latest state within POLL_S otherwise."""
        with self._lock:
            if step is not None:
                self.step = step
            if phase is not None:
                self.phase = phase
            self._beat_time = time.time()
            self._dirty = True
        if self.out_dir is not None and time.monotonic() - self._written >= HEARTBEAT_EVERY_S:
            self._write_heartbeat(force=False)

    def _write_heartbeat(self, force: bool = True) -> None:
        with self._lock:
            if self.out_dir is None or not (self._dirty or force):
                return
            state = {"rank": self.rank, "step": self.step, "phase": self.phase, "time": self._beat_time,
                     "alive": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
            self._dirty = False
            self._written = time.monotonic()
        try:
            write_json(state, heartbeat_file(self.out_dir, self.rank))
        except OSError:
            pass  # a full or vanished disk must not kill training; the timeout message will lack this rank

    # ---- watcher thread: heartbeat flushes, stack requests, SIGUSR1 -------------------------------

    def _watch(self) -> None:
        read_fd = self._wakeup[0] if self._wakeup else None
        while not self._stop.is_set():
            signalled = False
            if read_fd is not None:
                ready, _, _ = select.select([read_fd], [], [], POLL_S)
                if ready:
                    try:
                        signalled = signal.SIGUSR1 in os.read(read_fd, 512)
                    except OSError:
                        pass
            else:
                self._stop.wait(POLL_S)
            self._write_heartbeat(force=time.monotonic() - self._written >= ALIVE_EVERY_S)
            if signalled:
                request_stacks(self, f"SIGUSR1 to rank {self.rank} (pid {os.getpid()})")
            request = _read_json(self.out_dir / "stacks" / "request.json")
            if request and request.get("id") != self._last_request:
                self._last_request = request.get("id")
                write_stacks(self, f"requested: {request.get('reason', '?')}")


def heartbeat_file(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / "heartbeats" / f"rank-{rank}.json"


def read_heartbeat(out_dir: Path, rank: int) -> dict:
    """Rank N's last heartbeat ({} if it has none yet): for tools and tests that watch a run from outside."""
    return _read_json(heartbeat_file(out_dir, rank)) or {}


def stack_file(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / "stacks" / f"rank-{rank}.txt"


def _read_json(file: Path) -> dict | None:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# Set-up and teardown

def setup(timeout_s: float = 600.0, backend: str | None = None, out_dir: str | os.PathLike | None = None) -> Dist:
    """Read torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and join the job;
    without it, return a one-process Dist. `backend` None picks NCCL on CUDA, gloo otherwise."""
    env = os.environ
    out = Path(out_dir) if out_dir is not None else None
    if "RANK" not in env or "WORLD_SIZE" not in env:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        d = Dist(device=device, timeout_s=timeout_s, out_dir=out)
        _start_watcher(d)
        return d

    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", 0))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ValueError(f"rank {rank}: RANK and WORLD_SIZE are set but {', '.join(missing)} is not; start "
                         "the job with torchrun (which sets all of them) or unset RANK for one process")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK {rank} is not in [0, WORLD_SIZE={world_size})")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if backend == "nccl":
        # Raise in the waiting thread instead of hanging (blocking wait takes precedence), and tear the
        # process down for errors in collectives that nobody waits on. Set before CUDA or NCCL start.
        env.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ValueError(f"rank {rank}: LOCAL_RANK {local_rank} but only {n} GPU(s) are visible "
                             f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                             "--nproc_per_node must not exceed the GPUs of a node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)

    d = Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device, backend=backend,
             timeout_s=timeout_s, out_dir=out)
    _start_watcher(d)
    d.heartbeat(0, "init_process_group")
    d._write_heartbeat()
    timeout = datetime.timedelta(seconds=timeout_s)
    start = time.monotonic()
    try:
        tdist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None)
        d.cpu_group = tdist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else tdist.group.WORLD
    except Exception as e:
        _fail(d, "init_process_group", f"joining the job of {world_size} processes", time.monotonic() - start, e)
    d.heartbeat(0, "started")
    return d


def teardown(d: Dist) -> None:
    """Stop the watcher, restore the signal handler, leave the process group. Call it in a `finally`."""
    error = sys.exc_info()[1]
    d.heartbeat(phase=f"exited: {type(error).__name__}: {str(error)[:200]}" if error else "exited")
    d._write_heartbeat()
    d._stop.set()
    if d._watcher is not None:
        d._watcher.join(timeout=2 * POLL_S + 1)
    if d._wakeup is not None:
        read_fd, write_fd, old_handler, old_wakeup = d._wakeup
        signal.set_wakeup_fd(old_wakeup)
        signal.signal(signal.SIGUSR1, old_handler)
        os.close(read_fd)
        os.close(write_fd)
        d._wakeup = None
    # After a failed collective the group may be wedged (NCCL can block in destroy); the process is about
    # to exit anyway, so leave it.
    if d.is_distributed and tdist.is_initialized() and not d._failed:
        tdist.destroy_process_group()


def _start_watcher(d: Dist) -> None:
    """Heartbeat flushes, stack requests and SIGUSR1 (see the module docstring)."""
    in_main = threading.current_thread() is threading.main_thread()
    if d.out_dir is None:
        if in_main and hasattr(signal, "SIGUSR1"):
            faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
        return
    (d.out_dir / "heartbeats").mkdir(parents=True, exist_ok=True)
    (d.out_dir / "stacks").mkdir(parents=True, exist_ok=True)
    previous = _read_json(d.out_dir / "stacks" / "request.json")
    d._last_request = previous.get("id", "") if previous else ""   # an old request is not ours to answer
    if in_main and hasattr(signal, "SIGUSR1"):
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        # The Python-level handler does nothing; what matters is that the C-level handler writes the signal
        # number to the wakeup fd at once, whatever the main thread is blocked in.
        old_handler = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
        old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        d._wakeup = (read_fd, write_fd, old_handler, old_wakeup)
    d._watcher = threading.Thread(target=d._watch, name="llava-min-watcher", daemon=True)
    d._watcher.start()


# --------------------------------------------------------------------------------------------------
# Stacks

def write_stacks(d: Dist, reason: str) -> Path | None:
    """Write every thread's Python stack of this rank to OUT/stacks/rank-N.txt (stderr without OUT)."""
    frames = sys._current_frames()
    names = {t.ident: t.name for t in threading.enumerate()}
    lines = [f"# rank {d.rank} of {d.world_size}, pid {os.getpid()} on {socket.gethostname()}, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}",
             f"# reason: {reason}",
             f"# last heartbeat: step {d.step}, {d.phase}", ""]
    for ident, frame in frames.items():
        if names.get(ident) == "llava-min-watcher":
            continue
        lines.append(f"Thread {names.get(ident, '?')} ({ident}), most recent call last:")
        lines.extend(line.rstrip("\n") for line in traceback.format_stack(frame))
        lines.append("")
    text = "\n".join(lines) + "\n"
    if d.out_dir is None:
        sys.stderr.write(text)
        return None
    file = stack_file(d.out_dir, d.rank)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text + "# faulthandler (C-level view of the same threads)\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        os.replace(tmp, file)
    except OSError:
        return None
    return file


def request_stacks(d: Dist, reason: str) -> None:
    """Ask every rank (this one included) to write its stacks; see the module docstring."""
    if d.out_dir is None:
        write_stacks(d, reason)
        return
    request_id = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
    try:
        write_json({"id": request_id, "reason": reason, "rank": d.rank, "time": time.time()},
                   d.out_dir / "stacks" / "request.json")
    except OSError:
        pass


# --------------------------------------------------------------------------------------------------
# Named collectives

@contextmanager
def collective(d: Dist, what: str, kind: str = "collective", any_error: bool = False):
    """Run a block that contains collectives (e.g. DDP's backward) so that a distributed timeout or failure
    inside it becomes a DistTimeout naming `what`, with heartbeats and stacks. Other errors pass through,
    unless `any_error` (the block is nothing but a collective)."""
    d.heartbeat(phase=f"in {kind} '{what}'")
    start = time.monotonic()
    try:
        yield
    except DistTimeout:
        raise                                   # already named by an inner collective
    except RuntimeError as e:
        if not (any_error or isinstance(e, getattr(tdist, "DistError", ())) or
                any(h in str(e).lower() for h in DIST_ERROR_HINTS)):
            raise
        _fail(d, kind, what, time.monotonic() - start, e)
    d.heartbeat(phase=f"after {kind} '{what}'")


def all_reduce(d: Dist, tensor: torch.Tensor, op=tdist.ReduceOp.SUM, what: str = "all_reduce") -> torch.Tensor:
    """In-place all-reduce on the default group, waited on with the timeout. One process: returns tensor."""
    if not d.is_distributed:
        return tensor
    with collective(d, what, "all_reduce", any_error=True):
        work = tdist.all_reduce(tensor, op=op, async_op=True)
        work.wait(timeout=datetime.timedelta(seconds=d.timeout_s))
    return tensor


def barrier(d: Dist, what: str = "barrier") -> None:
    """Every rank waits for every other (gloo's monitored_barrier: a timeout names the ranks that never came)."""
    if not d.is_distributed:
        return
    with collective(d, what, "barrier", any_error=True):
        tdist.monitored_barrier(group=d.cpu_group, timeout=datetime.timedelta(seconds=d.timeout_s),
                                wait_all_ranks=True)


def all_gather_object(d: Dist, obj, what: str = "all_gather_object") -> list:
    """[obj of rank 0, obj of rank 1, ...] over the gloo group (its timeout is d.timeout_s)."""
    if not d.is_distributed:
        return [obj]
    out = [None] * d.world_size
    with collective(d, what, "all_gather_object", any_error=True):
        tdist.all_gather_object(out, obj, group=d.cpu_group)
    return out


# --------------------------------------------------------------------------------------------------
# Failure reports

def describe_ranks(d: Dist, waiting_in: str | None = None) -> str:
    """One line per rank from OUT/heartbeats: step, phase, and how long ago."""
    if d.out_dir is None:
        return f"  rank {d.rank}: step {d.step}, {d.phase} (no --out folder: other ranks' heartbeats unknown)"
    now = time.time()
    lines = []
    for rank in range(d.world_size):
        beat = read_heartbeat(d.out_dir, rank)
        if not beat:
            lines.append(f"  rank {rank}: no heartbeat (never reached set-up, or {d.out_dir} is not shared)")
            continue
        ago, silent = now - beat.get("time", now), now - beat.get("alive", now)
        phase = str(beat.get("phase"))
        note = ""
        if silent > 3 * ALIVE_EVERY_S and not phase.startswith("exited"):
            note += f"; process silent for {silent:.0f} s (stopped, frozen or killed)"
        if waiting_in and phase != waiting_in and not phase.startswith("exited"):
            note += "   <- not in this collective"
        lines.append(f"  rank {rank} (pid {beat.get('pid')} on {beat.get('host')}): step {beat.get('step')}, "
                     f"{phase}, {ago:.1f} s ago{note}")
    return "\n".join(lines)


def _wait_for_stacks(d: Dist, since: float) -> list[int]:
    """Ranks whose stack file is newer than `since`, waiting up to STACK_WAIT_S for the live ones."""
    deadline = time.monotonic() + STACK_WAIT_S
    beats = [read_heartbeat(d.out_dir, r) for r in range(d.world_size)]
    live = {r for r, b in enumerate(beats) if time.time() - b.get("alive", 0) < 3 * ALIVE_EVERY_S}
    while True:
        written = []
        for rank in range(d.world_size):
            try:
                if stack_file(d.out_dir, rank).stat().st_mtime >= since:
                    written.append(rank)
            except OSError:
                pass
        if live <= set(written) or time.monotonic() > deadline:
            return written
        time.sleep(0.2)


def _fail(d: Dist, kind: str, what: str, elapsed: float, error: BaseException):
    """Write stacks, ask the other ranks for theirs, and raise DistTimeout with the whole picture."""
    d._failed = True
    waiting_in = f"in {kind} '{what}'"
    d.heartbeat(phase=waiting_in)
    d._write_heartbeat()
    text = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    timed_out = elapsed >= 0.9 * d.timeout_s or "timed out" in str(error).lower() or "timeout" in str(error).lower()
    since = time.time() - 1.0
    own = write_stacks(d, f"{kind} '{what}' {'timed out' if timed_out else 'failed'}")
    stacks = ""
    if d.out_dir is not None:
        request_stacks(d, f"rank {d.rank}: {kind} '{what}' {'timed out' if timed_out else 'failed'}")
        d._last_request = (_read_json(d.out_dir / "stacks" / "request.json") or {}).get("id", "")
        written = _wait_for_stacks(d, since)
        silent = [r for r in range(d.world_size) if r not in written]
        stacks = (f"\nPython stacks: {own.parent}/rank-N.txt, written by rank(s) {', '.join(map(str, written))}"
                  + (f"; none from rank(s) {', '.join(map(str, silent))} (stopped, dead, or on another node "
                     "without a shared OUT)" if silent else ""))
    if timed_out:
        head = (f"rank {d.rank}: {kind} '{what}' at step {d.step} timed out after {elapsed:.0f} s "
                f"(--dist-timeout {d.timeout_s:g} s). Backend said: {text}")
        advice = ("A rank that is stuck elsewhere (data loading, a long first step, a hang) or stopped makes "
                  "every other rank wait here: its heartbeat and stack show where it is. If it is only slow "
                  "(e.g. preparing data), raise --dist-timeout.")
    else:
        head = (f"rank {d.rank}: {kind} '{what}' at step {d.step} failed after {elapsed:.1f} s: {text}")
        advice = ("Another rank probably exited or crashed: look for its error above (its heartbeat says how "
                  "it ended).")
    raise DistTimeout(f"{head}\nRanks last seen:\n{describe_ranks(d, waiting_in)}{stacks}\n{advice}") from error


# --------------------------------------------------------------------------------------------------
# Start-up agreement

def config_hash(obj) -> str:
    """A short, order-independent hash of a JSON-able configuration (paths and numbers as written)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_consistent(d: Dist, fields: dict) -> None:
    """All ranks compare `fields` (e.g. data size, step count, config hash); any difference raises
    RankMismatch on every rank, naming the field and which rank has which value. A collective."""
    mine = {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in fields.items()}
    everyone = all_gather_object(d, mine, what="start-up consistency check")
    problems = []
    for key in dict.fromkeys(k for ranks in everyone for k in ranks):
        values = [ranks.get(key, "<missing>") for ranks in everyone]
        if any(v != values[0] for v in values):
            by_value: dict[str, list[int]] = {}
            for rank, v in enumerate(values):
                by_value.setdefault(repr(v), []).append(rank)
            odd = [r for r, v in enumerate(values) if v != values[0]]
            groups = "; ".join(f"{'rank' if len(r) == 1 else 'ranks'} {', '.join(map(str, r))}: {v}"
                               for v, r in by_value.items())
            problems.append(f"'{key}' differs on rank(s) {', '.join(map(str, odd))} from rank 0 ({groups})")
    if problems:
        raise RankMismatch(f"rank {d.rank}: the ranks disagree at start-up:\n  " + "\n  ".join(problems) +
                           "\nEvery rank must read the same data files and the same arguments (same "
                           "checkout, same paths on every node); fix the differing rank's environment.")
