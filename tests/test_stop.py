"""Stopping on a signal, through the real entry points (train.py alone, or under torchrun, gloo).

Proves, with real processes on the tiny presets:
  * SIGTERM to torchrun (2 ranks, DDP; and --fsdp) between checkpoints: both ranks finish the step
    and save one checkpoint of the step reached; rank 0 prints one line with the step, the
    checkpoint and the command to continue; every rank exits 143 (its heartbeat says so; torchrun
    ends with its own status); no process is left; and the printed command, run as printed, ends
    bit-identical to an uninterrupted run (weights, every step's loss, every held-out loss);
  * SIGINT to a one-process run's process group (a terminal's Ctrl-C): the same, exit status 130,
    no KeyboardInterrupt traceback; SIGUSR1 (a scheduler's warning) likewise, exit status 138;
  * a second SIGTERM while the stop's checkpoint is being written ends the run at once (killed by
    SIGTERM), the previous checkpoint stays complete, and --resume removes the unfinished one and
    finishes the run;
  * the flag is agreed with an all-reduce (MAX); a step and save longer than --stop-grace is
    reported; the command to continue and torchrun's grace come from torchrun's command line.
"""
import json
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from _procs import finish, kill_session, start as _start, wait_for
from llava_min import stop
from llava_min.checkpoint import checkpoint_problem
from llava_min.dist import Dist
from llava_min.tools.hang import read_heartbeat
from test_faults import assert_nothing_left, shapes  # noqa: F401 (a fixture)
from test_train import weights

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
STEPS = 16
LINE = re.compile(r"stopped by (SIG\w+) after step (\d+); checkpoint (\S+); continue with: (.+)")


def train_cmd(shapes, out, *extra) -> list[str]:
    cmd = ["train.py", "--data", shapes / "pretrain.json", "--image-folder", shapes,
           "--tokenizer", shapes / "tok.model", "--llm-config", "tiny", "--vit-config", "tiny",
           "--image-size", 28, "--max-length", 64, "--num-workers", 1, "--seed", 3,
           "--train", "projector,llm", "--lora-r", 4, "--lora-dropout", 0, "--lr", 1e-3,
           "--max-steps", STEPS, "--save-every", 1000, "--eval-data", shapes / "finetune.json",
           "--eval-every", 8, "--dist-timeout", 60, "--out", out, *extra]
    return list(map(str, cmd))


def torchrun(*args) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_to_end(cmd: list, log: Path, limit: float = 240) -> str:
    proc = _start(cmd, log, ENV, cwd=ROOT)
    try:
        rc, _, text = finish(proc, limit)
    finally:
        kill_session(proc)
    assert rc == 0, text[-3000:]
    return text


def stepped(out: Path, steps: int) -> bool:
    return (out / "metrics.jsonl").exists() and len(records(out)) >= steps


def signal_after_steps(cmd: list, out: Path, log: Path, sig: int, group: bool = False):
    """Start `cmd`, send `sig` once metrics.jsonl holds 2 steps (to the process, or to its whole
    process group as a terminal does); returns (exit status, output)."""
    proc = _start(cmd, log, ENV, cwd=ROOT)
    try:
        wait_for(lambda: stepped(out, 2), 180, "2 steps", proc)
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        rc, _, text = finish(proc, 60)
    finally:
        kill_session(proc)
    return rc, text


def check_stopped(out: Path, text: str, name: str) -> tuple[int, list[str]]:
    """The one line, its checkpoint complete and of the step reached; returns step and command."""
    found = LINE.findall(text)
    said = [line for line in text.splitlines() if not line.startswith(("train:", "  "))]
    assert len(found) == 1, "\n".join(said[-40:])
    sig, step, ckpt, command = found[0]
    step = int(step)
    assert sig == name and 0 < step < STEPS
    assert Path(ckpt) == out / "checkpoints" / f"step-{step:06d}"
    assert checkpoint_problem(ckpt) is None
    assert (out / "checkpoints" / "latest").read_text().strip() == Path(ckpt).name
    assert records(out)[-1]["step"] == step       # the step every rank had reached, and no further
    # No traceback of ours; torchrun, signalled itself, ends with one of its own (SignalException).
    tracebacks = text.count("Traceback (most recent call last)")
    assert tracebacks == text.count("SignalException: Process")
    return step, shlex.split(command)


def assert_same_run(full: Path, cut: Path) -> None:
    a = weights(full)
    b = weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after the stop and --resume"
    assert [r["loss"] for r in records(full)] == [r["loss"] for r in records(cut)]
    evals = [(r["step"], r["eval_loss"]) for r in records(full) if "eval_loss" in r]
    assert [s for s, _ in evals] == [8, 16]
    assert evals == [(r["step"], r["eval_loss"]) for r in records(cut) if "eval_loss" in r]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sigterm_to_torchrun_stops_saves_and_resumes_bit_identical(shapes, tmp_path, mode):  # noqa
    extra = ["--batch-size", "4"]
    if mode == "fsdp":
        extra.append("--fsdp")
    full = tmp_path / "full"
    cut = tmp_path / "cut"
    run_to_end(torchrun(*train_cmd(shapes, full, *extra)), tmp_path / "full.log")

    cmd = torchrun(*train_cmd(shapes, cut, *extra))
    rc, text = signal_after_steps(cmd, cut, tmp_path / "cut.log", signal.SIGTERM)
    assert rc != 0                        # torchrun's own status after a signal; the ranks' below
    step, command = check_stopped(cut, text, "SIGTERM")
    for rank in range(2):
        assert read_heartbeat(cut, rank)["phase"] == "exited: SystemExit: 143"
    assert command[:3] == [PY, "-m", "torch.distributed.run"] and command[-1] == "--resume"
    assert_nothing_left(f"{tmp_path}/")

    text = run_to_end(command, tmp_path / "resume.log")
    assert f"resumed from {cut / 'checkpoints' / f'step-{step:06d}'} at step {step}" in text
    assert_same_run(full, cut)


def test_sigint_and_sigusr1_to_one_process(shapes, tmp_path):  # noqa: F811
    full = tmp_path / "full"
    cut = tmp_path / "cut"
    usr1 = tmp_path / "usr1"
    run_to_end([PY, *train_cmd(shapes, full, "--batch-size", "8")], tmp_path / "full.log")

    # Ctrl-C: SIGINT to the whole process group (the trainer and its loader worker).
    cmd = [PY, *train_cmd(shapes, cut, "--batch-size", "8")]
    rc, text = signal_after_steps(cmd, cut, tmp_path / "cut.log", signal.SIGINT, group=True)
    assert rc == 130, text[-3000:]
    assert "KeyboardInterrupt" not in text and "Traceback" not in text
    step, command = check_stopped(cut, text, "SIGINT")
    assert command[0] == PY and command[-1] == "--resume"
    assert_nothing_left(f"{tmp_path}/")
    run_to_end(command, tmp_path / "resume.log")
    assert_same_run(full, cut)

    cmd = [PY, *train_cmd(shapes, usr1, "--batch-size", "8")]
    rc, text = signal_after_steps(cmd, usr1, tmp_path / "usr1.log", signal.SIGUSR1)
    assert rc == 138, text[-3000:]
    check_stopped(usr1, text, "SIGUSR1")


def test_second_sigterm_during_the_save_keeps_the_previous_one(shapes, tmp_path):  # noqa: F811
    # The save lasts tens of milliseconds: it may be published before the test catches it.
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        cmd = [PY, *train_cmd(shapes, out, "--batch-size", "8", "--save-every", "2")]
        ckpts = out / "checkpoints"
        proc = _start(cmd, tmp_path / f"log{attempt}", ENV, cwd=ROOT)
        try:
            wait_for(lambda: (ckpts / "latest").exists() and stepped(out, 3), 180, "a save", proc)
            before = (ckpts / "latest").read_text().strip()
            os.kill(proc.pid, signal.SIGTERM)
            tmp = None
            while proc.poll() is None and tmp is None:
                tmp = next((p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-")), None)
            # Hold the save where it is while the first signal ages: a repeat within ECHO_S
            # counts as the same request.
            os.kill(proc.pid, signal.SIGSTOP)
            previous = (ckpts / "latest").read_text().strip()
            time.sleep(stop.ECHO_S + 0.2)
            os.kill(proc.pid, signal.SIGTERM)
            os.kill(proc.pid, signal.SIGCONT)
            rc, _, text = finish(proc, 30)
        finally:
            kill_session(proc)
        if tmp is not None and (ckpts / tmp).exists() and previous == before:
            break
    else:
        raise AssertionError("three stop saves were published before the second signal landed")
    assert rc == -signal.SIGTERM, text[-3000:]     # ended by the signal itself, at once
    assert "second signal (SIGTERM): ending now" in text and "stopped by" not in text
    assert checkpoint_problem(ckpts / previous) is None
    assert_nothing_left(f"{tmp_path}/")

    text = run_to_end(cmd + ["--resume"], tmp_path / "resume.log")
    step = int(previous.split("-")[1])
    assert f"resumed from {ckpts / previous} at step {step}" in text
    assert (ckpts / "latest").read_text().strip() == f"step-{STEPS:06d}"
    leftovers = [p for p in ckpts.iterdir() if p.name.startswith(".")]
    assert not leftovers, "the cut save's leftovers remain"


# ---- in-process: the flag, the grace warning, the command line
# ------------------------------------------

def test_agreement_and_grace_warning(capsys):
    stopper = stop.Stopper(Dist(), grace_s=2.0)
    assert not stopper.agreed(1)
    stopper.last_agreed = time.monotonic() - 5     # a step and its save that took 5 s
    stopper.signum = signal.SIGTERM
    assert stopper.agreed(2)
    said = capsys.readouterr().out
    assert "step 2 (with the save before it, if any) took 5 s, more than --stop-grace 2 s" in said
    assert "--shutdown-timeout" in said
    with pytest.raises(SystemExit) as e:
        stopper.finish(2, Path("out"))
    assert e.value.code == 143
    said = capsys.readouterr().out
    assert "stopped by SIGTERM after step 2; checkpoint out/checkpoints/step-000002" in said


def test_torchrun_command_and_grace_from_its_command_line(monkeypatch):
    line = ["/usr/bin/python3", "/venv/bin/torchrun", "--nproc_per_node", "8",
            "--shutdown-timeout", "90", "train.py", "--out", "o"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setattr(stop, "_parent_command", lambda: line[1:])
    assert stop.resume_command() == [*line[1:], "--resume"]
    assert stop.torchrun_grace() == 90
    monkeypatch.setattr(stop, "_parent_command", lambda: line[1:4] + line[6:])
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "12")
    assert stop.torchrun_grace() == 12
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert stop.torchrun_grace() is None
