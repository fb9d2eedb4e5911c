"""Stopping on a signal: every rank finishes its step, all save one checkpoint together, the run says how to go on.

    stop.install(d, grace_s=args.stop_grace)    # at start-up: SIGTERM, SIGINT, SIGUSR1 now end the run quietly
    stop.arm()                                  # before the first step: from now on a signal means "save, then stop"
    stopping = stop.agreed(step)                # after each optimizer step: a one-number all-reduce of the flag
    if stopping:
        save(...)                               # the training script's own checkpoint save, on every rank
        stop.finish(step, out)                  # one line: the step, the checkpoint, the command; SystemExit(143)

Why these signals, and what each one ends with:
  * SIGTERM: what a scheduler sends at a time limit or on preemption (SLURM, Kubernetes, `timeout`), and what
    torchrun sends its workers when it gets SIGTERM itself. Exit status 143 (128 + 15), the shell's convention.
  * SIGINT: Ctrl-C. Exit status 130 (128 + 2). No KeyboardInterrupt traceback: the handler replaces Python's.
  * SIGUSR1: the warning a scheduler sends ahead of the end (SLURM `--signal=USR1@120`). The job is about to
    be killed, so the run stops as for SIGTERM (one checkpoint now rather than a killed save later) and exits
    138 (128 + 10): not 0, so a wrapper that requeues the job sees "stopped, not finished". The hang tool's
    stack dumps, once on SIGUSR1, moved to SIGUSR2 for this (llava_min/tools/hang.py).

The ranks agree before anyone saves: a signal may reach one rank only, or reach the ranks in different steps;
a rank that saved alone would wait for the others in the save's collectives. So each rank keeps its flag (the
signal number, 0 for none) and once per optimizer step all ranks all-reduce it with MAX: the step in which any
rank has it set, every rank sees it, and all stop after that same step.

A second signal ends the process at once (the default action of that signal): checkpoints are written under a
temporary name and renamed when complete (llava_min/checkpoint.py), so a save cut short leaves the previous
checkpoint as it was, and `--resume` ignores and removes the unfinished one. A repeat of the same signal within
ECHO_S of the first is taken as the same request: a scheduler may signal every process of the job and torchrun
then forwards its own copy to each worker, so one request can arrive twice within milliseconds.

Under torchrun the agent gets the signal first. It forwards SIGTERM / SIGINT (its --signals-to-handle list,
default SIGTERM,SIGINT,SIGHUP,SIGQUIT; add SIGUSR1 for the scheduler's warning) to each worker's process group,
waits --shutdown-timeout seconds (default 30, or TORCH_ELASTIC_SHUTDOWN_TIMEOUT), then SIGKILLs them
(torch/distributed/elastic/multiprocessing/api.py, SubprocessContext._close). The step in progress plus the save
must fit in that time; `--stop-grace` is what the run assumes it has, and it says so when a measured step plus
save would not fit.

Loader workers are forked from the main process and inherit its handlers; in them the handler does nothing, so a
signal sent to the whole process group (torchrun's killpg, a terminal's Ctrl-C) leaves the workers to the main
process, which needs them to finish its step and stops them itself.
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
ECHO_S = 1.0                 # a repeat of the first signal this soon after it is the same request (see above)
TORCHRUN_DEFAULT_GRACE_S = 30  # torchrun's --shutdown-timeout when neither the flag nor its variable is set


class Stopper:
    """The signal state of this process: one per process, since signal handlers are."""

    def __init__(self, d: dist.Dist, grace_s: float):
        self.d = d
        self.grace_s = grace_s
        self.pid = os.getpid()          # a forked loader worker inherits the handler; it must not act on it
        self.signum = 0                 # the first signal received, 0 for none
        self.first_at = 0.0
        self.armed = False              # before the loop there is nothing to save: a signal exits at once
        self.last_agreed = None         # time of the previous agreement: measures a step (and its save)
        self.warned = False

    # ---- the handler (runs in the main thread, between two bytecodes of whatever it was doing) --------

    def on_signal(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:
            return                      # a loader worker: the main process decides (see the module docstring)
        now = time.monotonic()
        if self.signum and signum == self.signum and now - self.first_at < ECHO_S:
            return                      # the same request delivered twice (the scheduler's and torchrun's copy)
        name = signal.Signals(signum).name
        if self.signum:
            _say(self.d, f"second signal ({name}): ending now; the last complete checkpoint stays as it was")
            _die(signum)
        if not self.armed:
            _say(self.d, f"{name} during start-up (before the first step): nothing to save; exiting")
            _flush()
            os._exit(128 + signum)      # no collective is safe to finish here, and no worker is running yet
        self.signum = signum
        self.first_at = now
        _say(self.d, f"{name} received: finishing this step, then saving a checkpoint "
                     "(a second signal ends the run at once)")

    # ---- called by the training loop -----------------------------------------------------------------

    def agreed(self, step: int) -> bool:
        """A collective: True on every rank if any rank got a signal; the same answer on all of them."""
        flag = torch.tensor([self.signum], dtype=torch.int64, device=self.d.device)
        dist.all_reduce(self.d, flag, op=dist.tdist.ReduceOp.MAX, what=f"stop flag after step {step}")
        self.signum = int(flag.item())  # a rank that got none exits with the signal that stopped the others
        now = time.monotonic()
        if self.last_agreed is not None:
            self._check_grace(now - self.last_agreed, step)
        self.last_agreed = now
        return self.signum != 0

    def _check_grace(self, seconds: float, step: int) -> None:
        """A stop needs at worst one step and one save (the interval between two agreements includes both when a
        checkpoint was written in it): say once when that is longer than the grace the run is given."""
        if seconds <= self.grace_s or self.warned:
            return
        self.warned = True
        self.d.print0(f"warning: step {step} (with the save before it, if any) took {seconds:.0f} s, more than "
                      f"--stop-grace {self.grace_s:g} s: a stop on SIGTERM may be killed before its checkpoint is "
                      "written. Give the job more time between SIGTERM and SIGKILL (torchrun --shutdown-timeout, "
                      "SLURM KillWait, Kubernetes terminationGracePeriodSeconds) and raise --stop-grace to match, "
                      "or send SIGUSR1 earlier (SLURM --signal=USR1@SECONDS)")

    def finish(self, step: int, out: Path) -> None:
        """After the checkpoint of `step` is saved on every rank: one line from rank 0, then SystemExit."""
        name = signal.Signals(self.signum).name
        ckpt = Path(out) / checkpoint.CHECKPOINTS / checkpoint.step_name(step)
        self.d.print0(f"stopped by {name} after step {step}; checkpoint {ckpt}; continue with: "
                      f"{shlex.join(resume_command())}")
        raise SystemExit(128 + self.signum)


_stopper: Stopper | None = None


def install(d: dist.Dist, grace_s: float = 30.0) -> Stopper:
    """Handle SIGTERM, SIGINT and SIGUSR1 in this process from now on (main thread only, as Python requires);
    say at start-up when torchrun gives its workers less time than --stop-grace."""
    global _stopper
    _stopper = Stopper(d, grace_s)
    for signum in SIGNALS:
        signal.signal(signum, _stopper.on_signal)
    given = torchrun_grace()
    if given is not None and given < grace_s:
        d.print0(f"warning: torchrun gives its workers {given:g} s between SIGTERM and SIGKILL (--shutdown-timeout), "
                 f"less than --stop-grace {grace_s:g} s: start torchrun with --shutdown-timeout {grace_s:g}")
    return _stopper


def arm() -> None:
    """From now on a signal means: finish the step, save, stop (before, it exits at once)."""
    if _stopper is not None:
        _stopper.armed = True


def agreed(step: int) -> bool:
    """After optimizer step `step` (a collective on every rank, if installed): whether the run stops here."""
    return _stopper is not None and _stopper.agreed(step)


def finish(step: int, out) -> None:
    """Say where the checkpoint is and how to continue, then exit with 128 + the signal number."""
    _stopper.finish(step, Path(out))


# ---- helpers ---------------------------------------------------------------------------------------

def _say(d: dist.Dist, msg: str) -> None:
    """One line on stderr, written with os.write: print() inside a signal handler can re-enter print()."""
    prefix = f"[rank {d.rank}] " if d.world_size > 1 else ""
    os.write(2, f"{prefix}{msg}\n".encode())


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):  # closed, or re-entered inside a write
            pass


def _die(signum: int) -> None:
    """End this process by `signum`'s default action (its exit status says which signal, as the shell expects)."""
    _flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    time.sleep(1)                       # the signal is delivered on return from kill; this is never reached
    os._exit(128 + signum)


def _parent_command() -> list[str] | None:
    """torchrun's command line (this worker's parent) on Linux, without the Python interpreter in front."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    if len(words) > 1 and Path(words[0]).name.startswith("python") and Path(words[1]).name == "torchrun":
        words = words[1:]
    return words or None


def resume_command() -> list[str]:
    """The command that started this run, with --resume: torchrun's under torchrun, else `python script ...`."""
    command = None
    if "TORCHELASTIC_RUN_ID" in os.environ:
        command = _parent_command()
    if command is None:
        command = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    if "--resume" not in command:
        command.append("--resume")
    return command


def torchrun_grace() -> float | None:
    """Seconds torchrun waits between its SIGTERM and SIGKILL, read from its command line; None without torchrun."""
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
