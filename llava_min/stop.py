"""Stopping on a signal: every rank finishes its step, all save one checkpoint together, and the
run says how to go on.

    stop.install(d, grace_s=args.stop_grace)   # start-up: SIGTERM, SIGINT, SIGUSR1 end it quietly
    stop.arm()                                 # before step 1: a signal now means "save, then stop"
    stopping = stop.agreed(step)               # after each optimizer step: all-reduce of one number
    if stopping:
        save(...)                              # the training script's own save, on every rank
        stop.finish(step, out)                 # one line: step, checkpoint, command; SystemExit(143)

The signals, and the exit status each one ends with:
  * SIGTERM: what a scheduler sends at a time limit or on preemption (SLURM, Kubernetes,
    `timeout`), and what torchrun sends its workers when it gets one. 143 (128 + 15).
  * SIGINT: Ctrl-C. 130 (128 + 2). The handler replaces Python's: no KeyboardInterrupt traceback.
  * SIGUSR1: the warning a scheduler sends ahead of the end (SLURM `--signal=USR1@120`). The job
    is about to be killed, so the run stops as for SIGTERM (one checkpoint now rather than a save
    cut short later) and exits 138 (128 + 10): not 0, so a wrapper that requeues the job sees
    "stopped, not finished". The hang tool's stack dumps moved from SIGUSR1 to SIGUSR2 for this
    (llava_min/tools/hang.py).

The ranks agree before anyone saves. A signal may reach one rank only, or reach the ranks in
different steps, and a rank that saved alone would wait for the others in the save's collectives.
So each rank keeps its flag (the signal number, 0 for none), and once per optimizer step all ranks
all-reduce it with MAX: in the step in which any rank has it set, every rank sees it, and all stop
after that same step.

A second signal ends the process at once, by that signal's default action. Checkpoints are written
under a temporary name and renamed when complete (llava_min/checkpoint.py), so a save cut short
leaves the previous checkpoint as it was, and `--resume` ignores and removes the unfinished one. A
repeat of the first signal within ECHO_S of it counts as the same request: a scheduler may signal
every process of the job, and torchrun then forwards its own copy to each worker.

Under torchrun the agent gets the signal first. It forwards SIGTERM and SIGINT (its
--signals-to-handle list, default SIGTERM,SIGINT,SIGHUP,SIGQUIT; add SIGUSR1 for a scheduler's
warning) to each worker's process group, waits --shutdown-timeout seconds (default 30, or
TORCH_ELASTIC_SHUTDOWN_TIMEOUT), then sends SIGKILL (torch/distributed/elastic/multiprocessing/
api.py, SubprocessContext._close). The rest of the step and the save must fit in that time.
`--stop-grace` is the time the run assumes it has: it says so when a measured step and save
would not fit, and at start-up when torchrun's own wait is shorter.

A stop signal is also what torchrun sends the other ranks when one rank fails, and a rank may be
waiting in a collective that can then never finish. When a failed collective (DistTimeout) ends
the process after a stop signal, it says so in one line instead of a traceback, and exits as the
signal asks (`excepthook`): the last complete checkpoint is the one to resume from.

Loader workers are forked from the main process and inherit its handler; in them it does nothing.
A signal sent to a whole process group (torchrun's killpg, a terminal's Ctrl-C) thus leaves the
workers to the main process, which needs them to finish its step and then stops them itself.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch

from . import checkpoint, dist

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# A repeat of the first signal this soon after it is the same request (see the module docstring).
ECHO_S = 1.0
# torchrun's wait between SIGTERM and SIGKILL when neither --shutdown-timeout nor its variable is set.
TORCHRUN_DEFAULT_GRACE_S = 30


class Stopper:
    """The signal state of this process: one per process, as signal handlers are."""

    def __init__(self, d: dist.Dist, grace_s: float):
        self.d = d
        self.grace_s = grace_s
        # A forked loader worker inherits the handler: it must not act on it.
        self.pid = os.getpid()
        self.signum = 0                 # the first signal received, 0 for none
        self.first_at = 0.0
        # Before the loop there is nothing to save: a signal then exits at once.
        self.armed = False
        # When the ranks last agreed: the time between two agreements is a step (and its save).
        self.last_agreed = None
        self.warned = False
        self.previous_hook = sys.excepthook

    # ---- the handler (runs in the main thread, between two bytecodes of whatever it was doing) ----

    def on_signal(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:
            return                      # a loader worker: the main process decides
        now = time.monotonic()
        # The same request delivered twice (the scheduler's copy and torchrun's).
        if self.signum and signum == self.signum and now - self.first_at < ECHO_S:
            return
        name = signal.Signals(signum).name
        if self.signum:
            _say(self.d, f"second signal ({name}): ending now; the last complete checkpoint "
                         "stays as it was")
            _die(signum)
        if not self.armed:
            # No collective is safe to finish here, and no loader worker runs yet.
            _say(self.d, f"{name} during start-up (before the first step): nothing to save; exiting")
            _flush()
            os._exit(128 + signum)
        self.signum = signum
        self.first_at = now
        _say(self.d, f"{name} received: finishing this step, then saving a checkpoint "
                     "(a second signal ends the run at once)")

    # ---- called by the training loop ----------------------------------------------------------

    def agreed(self, step: int) -> bool:
        """A collective: True on every rank if any rank got a signal, the same answer on all."""
        flag = torch.tensor([self.signum], dtype=torch.int64, device=self.d.device)
        dist.all_reduce(self.d, flag, op=dist.tdist.ReduceOp.MAX, what=f"stop flag after step {step}")
        # A rank that got no signal exits with the one that stopped the others.
        self.signum = int(flag.item())
        now = time.monotonic()
        if self.last_agreed is not None:
            self._check_grace(now - self.last_agreed, step)
        self.last_agreed = now
        return self.signum != 0

    def _check_grace(self, seconds: float, step: int) -> None:
        """A stop needs at worst one step and one save, and the time between two agreements holds
        both when a checkpoint was written in it: say once when that exceeds the grace."""
        if seconds <= self.grace_s or self.warned:
            return
        self.warned = True
        self.d.print0(
            f"warning: step {step} (with the save before it, if any) took {seconds:.0f} s, more "
            f"than --stop-grace {self.grace_s:g} s: a stop on SIGTERM may be killed before its "
            "checkpoint is written. Give the job more time between SIGTERM and SIGKILL (torchrun "
            "--shutdown-timeout, SLURM KillWait, Kubernetes terminationGracePeriodSeconds) and "
            "raise --stop-grace to match, or send SIGUSR1 earlier (SLURM --signal=USR1@SECONDS)")

    def finish(self, step: int, out: Path) -> None:
        """After every rank saved the checkpoint of `step`: one line from rank 0, then SystemExit."""
        name = signal.Signals(self.signum).name
        ckpt = Path(out) / checkpoint.CHECKPOINTS / checkpoint.step_name(step)
        command = shlex.join(resume_command())
        self.d.print0(f"stopped by {name} after step {step}; checkpoint {ckpt}; "
                      f"continue with: {command}")
        raise SystemExit(128 + self.signum)

    def excepthook(self, kind, error, tb) -> None:
        """After a stop signal, a failed collective means a peer has gone: one line, no traceback."""
        if not self.signum or not issubclass(kind, dist.DistTimeout):
            self.previous_hook(kind, error, tb)
            return
        name = signal.Signals(self.signum).name
        first = str(error).splitlines()[0]
        _say(self.d, f"stopped by {name} in step {self.d.step}, which the ranks could not finish "
                     f"together ({first}); nothing saved: --resume continues from the last "
                     "complete checkpoint")
        _flush()
        os._exit(128 + self.signum)


_stopper: Stopper | None = None


def install(d: dist.Dist, grace_s: float = 30.0) -> Stopper:
    """Handle SIGTERM, SIGINT and SIGUSR1 in this process from now on (main thread only, as Python
    requires); say at start-up when torchrun gives its workers less time than --stop-grace."""
    global _stopper
    _stopper = Stopper(d, grace_s)
    for signum in SIGNALS:
        signal.signal(signum, _stopper.on_signal)
    sys.excepthook = _stopper.excepthook
    given = torchrun_grace()
    if given is not None and given < grace_s:
        d.print0(f"warning: torchrun gives its workers {given:g} s between SIGTERM and SIGKILL "
                 f"(--shutdown-timeout), less than --stop-grace {grace_s:g} s: start torchrun with "
                 f"--shutdown-timeout {grace_s:g}")
    return _stopper


def arm() -> None:
    """From now on a signal means: finish the step, save, stop (before, it exits at once)."""
    if _stopper is not None:
        _stopper.armed = True


def agreed(step: int) -> bool:
    """After optimizer step `step` (a collective on every rank, once installed): stop here?"""
    return _stopper is not None and _stopper.agreed(step)


def finish(step: int, out) -> None:
    """Say where the checkpoint is and how to continue, then exit with 128 + the signal number."""
    _stopper.finish(step, Path(out))


# ---- helpers ------------------------------------------------------------------------------------

def _say(d: dist.Dist, msg: str) -> None:
    """One line on stderr with os.write: print() inside a signal handler can re-enter print()."""
    prefix = ""
    if d.world_size > 1:
        prefix = f"[rank {d.rank}] "
    os.write(2, f"{prefix}{msg}\n".encode())


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):  # closed, or re-entered inside a write
            pass


def _die(signum: int) -> None:
    """End this process by `signum`'s default action: its exit status names the signal."""
    _flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    # The signal is delivered on return from kill; this is not reached.
    time.sleep(1)
    os._exit(128 + signum)


def _parent_command() -> list[str] | None:
    """torchrun's command line (this worker's parent, from /proc), as it was typed."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    # The torchrun script is started as `python .../torchrun ...`: the user typed `torchrun ...`.
    if len(words) > 1 and Path(words[0]).name.startswith("python") and Path(words[1]).name == "torchrun":
        words = words[1:]
    return words or None


def resume_command() -> list[str]:
    """The command that started this run, with --resume: torchrun's under torchrun."""
    command = None
    if "TORCHELASTIC_RUN_ID" in os.environ:
        command = _parent_command()
    if command is None:
        command = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    if "--resume" not in command:
        command.append("--resume")
    return command


def torchrun_grace() -> float | None:
    """Seconds torchrun waits between its SIGTERM and SIGKILL, from its command line; None
    without torchrun."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    words = _parent_command() or []
    for i, word in enumerate(words):
        for flag in ("--shutdown-timeout", "--shutdown_timeout"):
            if word == flag and i + 1 < len(words):
                return float(words[i + 1])
            if word.startswith(flag + "="):
                return float(word.split("=", 1)[1])
    return float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", TORCHRUN_DEFAULT_GRACE_S))
