"""Running a job under test in a process session of its own, so that clean-up reaches everything it started
(torchrun, its ranks, their loader workers), and waiting on it with bounds. Shared by the torchrun tests."""
import os
import signal
import subprocess
import time
from pathlib import Path


def start(cmd: list, log: Path, env: dict, cwd=None) -> subprocess.Popen:
    """Start `cmd` in a new session, output to `log` (kept as proc.log)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proc.log = Path(log)
    return proc


def kill_session(proc: subprocess.Popen) -> None:
    """SIGCONT (a stopped process cannot die otherwise), then SIGKILL the whole session."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(timeout=10)


def finish(proc: subprocess.Popen, limit: float) -> tuple[int, float, str]:
    """(exit code, seconds waited, output); fails the test if the job is still running after `limit` s."""
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_session(proc)
        raise AssertionError(f"still running after {limit} s:\n{proc.log.read_text()[-4000:]}") from None
    return rc, time.monotonic() - t0, proc.log.read_text()


def freeze_inside(pid: int, phase_of, wanted, what: str) -> str:
    """SIGSTOP `pid` while the other rank waits in a collective that `wanted(phase)` recognises; returns that phase.

    Where a stop lands is luck, so: stop, let the other rank run into its next collective (which needs the
    stopped one), read its phase from its heartbeat; if it is another collective, let the stopped rank go on a
    little and try again.
    """
    phase = ""
    for _ in range(40):
        os.kill(pid, signal.SIGSTOP)
        time.sleep(1.2)                         # the other rank's watcher writes its phase every 0.5 s
        phase = phase_of()
        if wanted(phase):
            return phase
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.13)
    raise AssertionError(f"the other rank was never seen waiting in {what} (last: {phase!r})")


def wait_for(cond, limit: float, what: str, proc: subprocess.Popen):
    """Poll `cond` until it returns something true; fail if the job ends first or `limit` s pass."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if value := cond():
            return value
        assert proc.poll() is None, f"the job ended ({proc.returncode}) while waiting for {what}:\n" \
                                    f"{proc.log.read_text()[-4000:]}"
        time.sleep(0.05)
    raise AssertionError(f"waited {limit} s for {what}:\n{proc.log.read_text()[-4000:]}")
