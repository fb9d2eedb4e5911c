"""Hang forensics: what a stuck or stopped rank leaves behind, and where every rank was when a collective failed.

    hang.attach(d, out)        # from now on d.heartbeat(step, phase) lands in OUT/heartbeats; undone by dist.teardown

OUT/heartbeats/rank-N.json: where rank N was last seen ("time") and when its process last showed life ("alive",
refreshed every second by a watcher thread: a rank stuck in Python looks alive, a stopped or frozen one does not).
OUT/stacks/rank-N.txt: every thread's stack, written on a request in OUT/stacks/request.json that every watcher
polls; a failed collective (`report`) and `kill -USR2 <pid>` on any rank make one, the run goes on. Ranks on other
nodes see it only if OUT is on a shared file system. The fields: docs/TROUBLESHOOTING.md, "First, the tools".
"""
from __future__ import annotations

import faulthandler
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import suppress
from pathlib import Path

from ..dist import Dist
from ..weights import atomic_path, write_json

HEARTBEAT_EVERY_S = 1.0   # the training thread writes it at most this often, the watcher at least ("alive")
POLL_S = 0.5              # how often the watcher flushes heartbeats and looks for stack requests
STACK_WAIT_S = 3.0        # how long a failing rank waits for the other live ranks' stacks
WATCHER = "llava-min-watcher"


def heartbeat_file(out_dir, rank: int) -> Path:
    return Path(out_dir) / "heartbeats" / f"rank-{rank}.json"


def stack_file(out_dir, rank: int) -> Path:
    return Path(out_dir) / "stacks" / f"rank-{rank}.txt"


def _read_json(file: Path) -> dict:
    with suppress(OSError, ValueError):   # not written yet, or not JSON: as good as none
        return json.loads(file.read_text())
    return {}


def read_heartbeat(out_dir, rank: int) -> dict:
    """Rank N's last heartbeat ({} if it has none yet): for tools and tests that watch a run from outside."""
    return _read_json(heartbeat_file(out_dir, rank))


class Forensics:
    """Heartbeat files, the watcher thread and stack dumps of one rank; `Dist.forensics` once attached."""

    def __init__(self, d: Dist, out_dir):
        self.d, self.out = d, Path(out_dir)
        self.step, self.phase, self.beat_time = d.step, d.phase, time.time()
        self.lock = threading.Lock()       # the training thread beats, the watcher writes
        self.dirty, self.written = True, 0.0
        for folder in ("heartbeats", "stacks"):
            (self.out / folder).mkdir(parents=True, exist_ok=True)
        self.request_file = self.out / "stacks" / "request.json"
        self.answered = _read_json(self.request_file).get("id", "")   # an old run's request is not ours to answer
        self.stop = threading.Event()
        self.wakeup = None                 # (read fd, write fd, old handler, old wakeup fd)
        # SIGUSR2, not SIGUSR1: SIGUSR1 is the warning schedulers send before a job's end, and a run stops and
        # saves on it (llava_min/stop.py).
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR2"):
            read_fd, write_fd = os.pipe()
            os.set_blocking(read_fd, False)
            os.set_blocking(write_fd, False)
            # The Python-level handler does nothing; what matters is that the C-level handler writes the signal
            # number to the wake-up fd at once, whatever the main thread is blocked in.
            old_handler = signal.signal(signal.SIGUSR2, lambda signum, frame: None)
            self.wakeup = (read_fd, write_fd, old_handler, signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False))
        self.write_heartbeat()
        self.watcher = threading.Thread(target=self._watch, name=WATCHER, daemon=True)
        self.watcher.start()

    # ---- called by dist -------------------------------------------------------------------------

    def beat(self, step: int, phase: str) -> None:
        """Cheap: the file is rewritten at most once per HEARTBEAT_EVERY_S here; the watcher writes the rest."""
        with self.lock:
            self.step, self.phase, self.beat_time, self.dirty = step, phase, time.time(), True
        if time.monotonic() - self.written >= HEARTBEAT_EVERY_S:
            self.write_heartbeat(force=False)

    def report(self, waiting_in: str, reason: str) -> str:
        """A collective failed: write this rank's stacks, request everyone's, wait for the live ranks' and
        describe where each rank was (the "Ranks last seen" lines and where the stacks are)."""
        self.write_heartbeat()
        since, deadline = time.time() - 1.0, time.monotonic() + STACK_WAIT_S
        self.write_stacks(reason)
        self.request_stacks(reason, ours=True)
        live = {r for r in range(self.d.world_size)
                if time.time() - read_heartbeat(self.out, r).get("alive", 0) < 3 * HEARTBEAT_EVERY_S}
        while True:   # up to STACK_WAIT_S for the live ranks' stacks (replaced atomically: once there, always there)
            written = [r for r in range(self.d.world_size)
                       if (file := stack_file(self.out, r)).exists() and file.stat().st_mtime >= since]
            if live <= set(written) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        now, lines = time.time(), []
        for rank in range(self.d.world_size):      # step, phase, how long ago, and whether its process is silent
            beat = read_heartbeat(self.out, rank)
            if not beat:
                lines.append(f"  rank {rank}: no heartbeat (never reached set-up, or {self.out} is not shared)")
                continue
            ago, quiet, phase = now - beat.get("time", now), now - beat.get("alive", now), str(beat.get("phase"))
            note = ""
            if quiet > 3 * HEARTBEAT_EVERY_S and not phase.startswith("exited"):
                note += f"; process silent for {quiet:.0f} s (stopped, frozen or killed)"
            if phase != waiting_in and not phase.startswith("exited"):
                note += "   <- not in this collective"
            lines.append(f"  rank {rank} (pid {beat.get('pid')} on {beat.get('host')}): step {beat.get('step')}, "
                         f"{phase}, {ago:.1f} s ago{note}")
        silent = ", ".join(str(r) for r in range(self.d.world_size) if r not in written)
        lines.append(f"Python stacks: {self.out / 'stacks'}/rank-N.txt, written by rank(s) "
                     f"{', '.join(map(str, written)) or 'none'}" + (f"; none from rank(s) {silent} (stopped, dead, "
                     "or on another node without a shared OUT)" if silent else ""))
        return "\n".join(lines)

    def close(self) -> None:
        """Final heartbeat, stop the watcher, give SIGUSR2 back (dist.teardown calls this)."""
        self.write_heartbeat()
        self.stop.set()
        self.watcher.join(timeout=2 * POLL_S + 1)
        if self.wakeup is not None:
            read_fd, write_fd, old_handler, old_wakeup = self.wakeup
            signal.set_wakeup_fd(old_wakeup)
            signal.signal(signal.SIGUSR2, old_handler)
            os.close(read_fd)
            os.close(write_fd)
            self.wakeup = None

    # ---- files ----------------------------------------------------------------------------------

    def write_heartbeat(self, force: bool = True) -> None:
        with self.lock:
            if not (self.dirty or force):
                return
            state = {"rank": self.d.rank, "step": self.step, "phase": self.phase, "time": self.beat_time,
                     "alive": time.time(), "pid": os.getpid(), "host": socket.gethostname()}
            self.dirty, self.written = False, time.monotonic()
        with suppress(OSError):  # a full or vanished disk must not kill training; a timeout message will lack this rank
            write_json(state, heartbeat_file(self.out, self.d.rank))

    def write_stacks(self, reason: str) -> None:
        """Every thread's Python stack of this rank (but the watcher's) into OUT/stacks/rank-N.txt."""
        names = {t.ident: t.name for t in threading.enumerate()}
        lines = [f"# rank {self.d.rank} of {self.d.world_size}, pid {os.getpid()} on {socket.gethostname()}, "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}", f"# reason: {reason}",
                 f"# last heartbeat: step {self.step}, {self.phase}", ""]
        for ident, frame in sys._current_frames().items():
            if names.get(ident) != WATCHER:
                lines += [f"Thread {names.get(ident, '?')} ({ident}), most recent call last:",
                          *(line.rstrip("\n") for line in traceback.format_stack(frame)), ""]
        with suppress(OSError):  # as for heartbeats: the report then names this rank among those without stacks
            with atomic_path(stack_file(self.out, self.d.rank)) as tmp, open(tmp, "w") as f:
                f.write("\n".join(lines) + "\n# faulthandler (C-level view of the same threads)\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)

    def request_stacks(self, reason: str, ours: bool = False) -> None:
        """Ask every rank to write its stacks; this one too unless `ours` (it has just written them)."""
        request_id = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        if ours:
            self.answered = request_id     # before the file exists, or the watcher may overwrite our reason
        with suppress(OSError):
            write_json({"id": request_id, "reason": reason, "rank": self.d.rank, "time": time.time()},
                       self.request_file)

    # ---- the watcher thread ---------------------------------------------------------------------

    def _watch(self) -> None:
        read_fd = self.wakeup[0] if self.wakeup else None
        while not self.stop.is_set():
            signalled = False
            if read_fd is None:
                self.stop.wait(POLL_S)
            elif select.select([read_fd], [], [], POLL_S)[0]:
                signalled = signal.SIGUSR2 in os.read(read_fd, 512)   # ready, so it does not block
            self.write_heartbeat(force=time.monotonic() - self.written >= HEARTBEAT_EVERY_S)
            if signalled:
                self.request_stacks(f"SIGUSR2 to rank {self.d.rank} (pid {os.getpid()})")
            request = _read_json(self.request_file)
            if request and request.get("id") != self.answered:
                self.answered = request.get("id")
                self.write_stacks(f"requested: {request.get('reason', '?')}")


def attach(d: Dist, out_dir) -> Forensics:
    """Heartbeats, stack requests and SIGUSR2 for this rank, under OUT (see the module docstring)."""
    d.forensics = Forensics(d, out_dir)
    return d.forensics
