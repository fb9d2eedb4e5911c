"""Checkpoints prove: a save/load round trip returns the training state; `latest` names the newest
checkpoint and older ones are pruned to `keep`; a SIGKILL at any line of save_checkpoint (every line, in
forked children, for a new step with pruning and for a replacement of the same step), or from outside at
random instants of a real training-like process, always leaves a complete, loadable checkpoint whose
weights and training state belong together, and the next save cleans up; leftover `.tmp-` folders are never
taken for checkpoints; a truncated file is detected; resume refuses other trained tensors; RNG capture/restore
replays the same random numbers.

This file is also the child process of the kill tests: `python tests/test_checkpoint.py sweep|loop OUT ...`.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llava_min import LlavaMinError
from llava_min.checkpoint import (COMPLETE, TRAINING_STATE, capture_rng_state, check_trained, checkpoint_problem,
                                  clean_leftovers, latest_checkpoint, load_training_state, restore_rng_state,
                                  save_checkpoint)
from llava_min.weights import save_state

ROOT = Path(__file__).resolve().parent.parent


def writer(version: float, pause: float = 0.0):
    """write_fn for a model of two parts in the official layout, whose tensors all equal `version`."""
    def write_fn(folder: Path):
        for part in ("llm", "projector"):
            (folder / part).mkdir()
            (folder / part / "config.json").write_text(json.dumps({"version": version}))
            time.sleep(pause)
            save_state({"w": torch.full((64, 64), float(version))}, folder / part)
    return write_fn


def state_for(step: int, version: float) -> dict:
    return {"step": step, "version": version, "optimizer": {"state": {0: {"exp_avg": torch.ones(8) * step}}},
            "scheduler": {"step": step}, "rng": capture_rng_state(), "world_size": 1,
            "args": {"lr": 1e-3, "out": "/tmp/x"}}


def read_back(folder: Path) -> tuple[int, float]:
    """(step, version) of a checkpoint, checking that its weights and its training state agree."""
    from safetensors.torch import load_file
    ts = load_training_state(folder)
    for part in ("llm", "projector"):
        w = load_file(folder / part / "model.safetensors")["w"]
        assert torch.all(w == ts["version"]), f"{folder}/{part} holds {w[0, 0]}, training state {ts['version']}"
    return ts["step"], ts["version"]


def listing(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_round_trip_latest_and_pruning(tmp_path):
    got = save_checkpoint(tmp_path, 100, state_for(100, 1.0), write_fn=writer(1.0))
    assert got == tmp_path / "checkpoints" / "step-000100"
    assert sorted(p.name for p in got.iterdir()) == [COMPLETE, "llm", "projector", TRAINING_STATE]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-000100\n"
    assert latest_checkpoint(tmp_path) == got
    ts = load_training_state(got)
    want = state_for(100, 1.0)
    assert ts["args"] == want["args"] and ts["scheduler"] == {"step": 100}
    assert torch.equal(ts["optimizer"]["state"][0]["exp_avg"], want["optimizer"]["state"][0]["exp_avg"])
    assert read_back(got) == (100, 1.0)

    for step in (200, 300, 400):
        save_checkpoint(tmp_path, step, state_for(step, step), keep=2, write_fn=writer(step))
    assert listing(tmp_path) == ["latest", "step-000300", "step-000400"]
    save_checkpoint(tmp_path, 400, state_for(400, 4.5), keep=2, write_fn=writer(4.5))  # same step: replaced
    assert listing(tmp_path) == ["latest", "step-000300", "step-000400"]
    assert read_back(latest_checkpoint(tmp_path)) == (400, 4.5)
    save_checkpoint(tmp_path, 500, state_for(500, 5), keep=None, write_fn=writer(5))
    assert listing(tmp_path) == ["latest", "step-000300", "step-000400", "step-000500"]
    with pytest.raises(LlavaMinError, match="keep=0"):
        save_checkpoint(tmp_path, 600, state_for(600, 6), keep=0, write_fn=writer(6))


def test_no_checkpoint_and_failed_write(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 1, state_for(1, 1), write_fn=writer(1))

    def broken(folder):
        (folder / "llm").mkdir()
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, state_for(2, 2), write_fn=broken)
    assert listing(tmp_path) == ["latest", "step-000001"]  # the temporary folder is gone too
    assert read_back(latest_checkpoint(tmp_path)) == (1, 1)


def test_stale_tmp_folders_are_ignored_and_cleaned(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, 4, state_for(4, 4), write_fn=writer(4))
    # A killed save of step 5 that got as far as writing everything (it even looks complete inside) ...
    stale = ckpts / f".tmp-step-000005-{dead_pid()}"
    shutil.copytree(ckpts / "step-000004", stale)
    # ... a save by a process that is still running (another run writing into this OUT) ...
    live = ckpts / f".tmp-step-000005-{os.getppid()}"
    live.mkdir()
    # ... a step folder without its COMPLETE marker, which `latest` names (written by hand, or by another tool).
    shutil.copytree(ckpts / "step-000004", ckpts / "step-000006")
    (ckpts / "step-000006" / COMPLETE).unlink()
    (ckpts / "latest").write_text("step-000006\n")

    assert latest_checkpoint(tmp_path) == ckpts / "step-000004"
    err = capsys.readouterr().err
    assert "'latest' names step-000006, but no COMPLETE marker" in err and "step-000004, the newest complete" in err
    with pytest.raises(LlavaMinError, match="step-000006: not a complete checkpoint: no COMPLETE marker"):
        load_training_state(ckpts / "step-000006")

    assert clean_leftovers(tmp_path) == [f"removed {stale.name}"]
    save_checkpoint(tmp_path, 7, state_for(7, 7), keep=2, write_fn=writer(7))
    # The incomplete step-000006 is not counted as a checkpoint, and not deleted either (not ours to judge).
    assert listing(tmp_path) == [live.name, "latest", "step-000004", "step-000006", "step-000007"]


def test_truncated_file_is_detected(tmp_path, capsys):
    save_checkpoint(tmp_path, 1, state_for(1, 1), write_fn=writer(1))
    second = save_checkpoint(tmp_path, 2, state_for(2, 2), write_fn=writer(2))
    weights = second / "llm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert "llm/model.safetensors has" in checkpoint_problem(second)
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert "truncated or replaced" in capsys.readouterr().err
    with pytest.raises(LlavaMinError, match="truncated"):
        load_training_state(second)


def test_interrupted_replacement_is_found_and_restored(tmp_path):
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, 1, state_for(1, 1), write_fn=writer(1))
    save_checkpoint(tmp_path, 2, state_for(2, 2), write_fn=writer(2))
    # Killed between moving the old step-000002 aside and renaming its replacement into place.
    aside = ckpts / f".old-step-000002-{dead_pid()}"
    os.rename(ckpts / "step-000002", aside)
    assert latest_checkpoint(tmp_path) == aside and read_back(aside) == (2, 2)
    assert clean_leftovers(tmp_path) == [f"restored step-000002 from {aside.name}"]
    assert latest_checkpoint(tmp_path) == ckpts / "step-000002"


def test_training_state_with_other_objects_is_refused_on_load(tmp_path):
    folder = save_checkpoint(tmp_path, 1, {"args": {"out": Path("/tmp")}}, write_fn=writer(1))
    with pytest.raises(LlavaMinError, match="other than tensors"):
        load_training_state(folder)


def test_check_trained_refuses_other_trained_tensors(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    check_trained({"0.weight", "0.bias"}, model, tmp_path)         # the same trained tensors: resume goes on
    for saved in ({"0.weight"}, {"0.weight", "0.bias", "1.weight"}):
        with pytest.raises(SystemExit, match=f"{tmp_path}: trained tensors differ.*same --train"):
            check_trained(saved, model, tmp_path)


def test_rng_capture_and_restore_replays_the_same_numbers(tmp_path):
    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
                torch.rand(4), torch.randn(3), torch.nn.functional.dropout(torch.ones(16), 0.5))
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.randn()
    folder = save_checkpoint(tmp_path, 1, {"rng": capture_rng_state()}, write_fn=writer(1))
    first = draw()
    restore_rng_state(load_training_state(folder)["rng"])  # through the file, loaded with weights_only
    second = draw()
    assert first[:4] == second[:4]
    assert all(torch.equal(a, b) for a, b in zip(first[4:], second[4:]))
    assert first != draw()  # the generators moved on: the check above can fail


# --------------------------------------------------------------------------------------------------
# SIGKILL at every line of a save (forked children), and from outside at random instants

def run_child(*args, timeout=60):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, __file__, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("scenario", ["new-step", "same-step"])
def test_sigkill_at_every_line_of_a_save_leaves_a_checkpoint(tmp_path, scenario):
    # tmpfs when there is one: hundreds of saves, and fsync is what costs on a disk
    shm = Path("/dev/shm")
    base = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    try:
        proc = run_child("sweep", base, scenario)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(report)
    assert report["kill_points"] > 60 and report["killed"] == report["kill_points"]
    found = {tuple(x) for x in report["resumed_from"]}
    if scenario == "new-step":  # killed before the rename: step 2; after it: step 3
        assert found == {(2, 2.0), (3, 3.0)}
    else:  # the old step 2 until the replacement is renamed into place, the new one after
        assert found == {(2, 2.0), (2, 2.5)}


def test_sigkill_from_outside_during_saves(tmp_path):
    rng = random.Random(0)
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, __file__, "loop", str(out)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 30
            while not (out / "checkpoints" / "latest").exists():  # wait for the first complete save
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
                time.sleep(0.02)
            time.sleep(rng.uniform(0.05, 0.6))  # somewhere in the middle of a later save
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        finally:
            proc.kill()
            proc.wait()
        step, version = read_back(latest_checkpoint(out))
        assert step >= 1 and version == step
        leftovers = [n for n in listing(out) if n.startswith(".")]
        save_checkpoint(out, step + 1, state_for(step + 1, step + 1), write_fn=writer(step + 1))
        assert [n for n in listing(out) if n.startswith(".")] == []
        print(f"attempt {attempt}: killed after step {step}; leftovers then {leftovers}")


def _sweep(out: Path, scenario: str) -> None:
    """Kill a forked save at each distinct line it runs in checkpoint.py or write_fn, then resume and save.

    A first, unkilled save lists its line events. A kill point is the first run of each (line, calling line)
    pair: repeats in loops (one fsync per file) change nothing a reader of the folder could see in between.
    The child SIGKILLs itself there; the parent finds and loads the checkpoint to resume from, checks that
    no `step-` folder is incomplete, saves again and checks that nothing was left behind.
    """
    import llava_min.checkpoint as ckpt_module
    traced = {ckpt_module.__file__, __file__}
    template = out / "template"
    save_checkpoint(template, 1, state_for(1, 1), write_fn=writer(1))
    save_checkpoint(template, 2, state_for(2, 2), write_fn=writer(2))
    step, version = (3, 3.0) if scenario == "new-step" else (2, 2.5)

    def tracer(on_line):
        def local(frame, event, arg):
            if event == "line":
                on_line((frame.f_code.co_filename, frame.f_lineno, frame.f_back.f_code.co_filename,
                         frame.f_back.f_lineno))
            return local
        return lambda frame, event, arg: local if frame.f_code.co_filename in traced else None

    def save(work):
        save_checkpoint(work, step, state_for(step, version), keep=2, write_fn=writer(version))

    events = []
    shutil.copytree(template, out / "dry-run")
    sys.settrace(tracer(events.append))
    save(out / "dry-run")
    sys.settrace(None)
    first_runs = {}
    for i, key in enumerate(events, 1):
        first_runs.setdefault(key, i)

    killed, resumed_from = 0, set()
    for k in sorted(first_runs.values()):
        work = out / f"k{k}"
        shutil.copytree(template, work)
        pid = os.fork()
        if pid == 0:
            count = 0

            def on_line(_):
                nonlocal count
                count += 1
                if count == k:
                    os.kill(os.getpid(), signal.SIGKILL)
            sys.settrace(tracer(on_line))
            save(work)
            os._exit(3)  # not reached: the kill point lies inside the save
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"kill point {k}: {status}"
        killed += 1
        found = latest_checkpoint(work)
        assert found is not None, f"kill point {k}: no checkpoint left: {listing(work)}"
        resumed_from.add(read_back(found))
        for p in (work / "checkpoints").glob("step-*"):
            assert checkpoint_problem(p) is None, f"kill point {k}: {p.name} is incomplete: {checkpoint_problem(p)}"
        save_checkpoint(work, 9, state_for(9, 9), keep=2, write_fn=writer(9))
        names = listing(work)
        assert not [n for n in names if n.startswith(".")], f"kill point {k}: leftovers {names}"
        assert read_back(latest_checkpoint(work)) == (9, 9)
        shutil.rmtree(work)
    print(json.dumps({"line_events": len(events), "kill_points": len(first_runs), "killed": killed,
                      "resumed_from": sorted(resumed_from)}))


def _loop(out: Path) -> None:
    """A training-like process that saves step after step, each save taking a while."""
    for step in range(1, 1000):
        save_checkpoint(out, step, state_for(step, step), keep=2, write_fn=writer(step, pause=0.05))


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "sweep":
        _sweep(Path(sys.argv[2]), sys.argv[3])
    else:
        _loop(Path(sys.argv[2]))
