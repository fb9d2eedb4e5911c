"""Fault injection through the real entry points: train.py as users start it, alone or under torchrun (gloo).

Proves, for each fault, that the run ends on its own, quickly, with a message that names the culprit and
says what to do, and that no process of the run is left behind afterwards (a /proc scan for any process
whose command line holds the test's private folder):
  * a missing image and malformed samples (roles not alternating, no "conversations") stop the run before
    any step, all listed at once with index, id and file; `python -m llava_min.data check` lists the same;
  * an image that exists but is garbage bytes (it passes the start-up check) stops the run at its first
    batch, naming the sample id and the file, in a few lines, exit status 3, no traceback,
    with --num-workers 0 and 2 (tests/test_bad_images.py: later steps, the checkpoint,
    --skip-bad-samples);
    `data check --decode` finds it;
  * a loader worker killed with SIGKILL during training ends the run within 30 s, naming the signal;
  * one rank frozen with SIGSTOP under torchrun ends the job within --dist-timeout + 60 s, non-zero, with a
    message from the waiting rank naming the collective, the timeout and the frozen rank, and the waiting
    rank's stack in OUT/stacks: frozen in the middle of a step (the other rank waits in DDP's gradient
    all-reduce) and frozen at start-up while reading its data (the other rank waits in the first
    collective after that; the 4-GPU story);
  * SIGKILL of the trainer while a checkpoint is being written leaves the previous checkpoint complete and
    no loader worker behind, and --resume continues from it to the last step;
  * --nan skip logs each skipped step with its sample ids and the run goes on, its schedule in step, and
    still saves the model;
  * a rank that raises (the data set fails on a sample that only rank 1 reads at step 1, as the
    sampler assigns samples; a fault injected by a wrapper around train.py) ends every rank long
    before --dist-timeout, non-zero, with the error printed by rank 1.

Every run uses the tiny presets on a 48-image shapes data set, and every wait has a limit. The SIGSTOP tests
take about a minute each: torchrun gives a rank that ignores its SIGTERM 30 s before SIGKILL.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _procs import finish, freeze_inside, kill_session, start as _start, wait_for
from llava_min.tools.hang import read_heartbeat

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SEED = 3
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
GARBAGE = b"this is not a PNG file" * 40


# --------------------------------------------------------------------------------------------------
# Helpers: data, commands, processes

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """48 shapes images at 28 px and a tokenizer trained on their captions (built once for the module)."""
    d = tmp_path_factory.mktemp("shapes")
    for cmd in ([PY, "data/make_shapes.py", "--out", d, "--n-train", "48", "--n-test", "8", "--seed", "1",
                 "--image-size", "28"],
                [PY, "-m", "llava_min.tokenizer", "train", "--data", d / "pretrain.json", "--vocab-size", "400",
                 "--out", d / "tok.model"]):
        subprocess.run(list(map(str, cmd)), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=120)
    return d


def train_cmd(shapes, data, out, *extra) -> list[str]:
    """train.py on the tiny presets; later flags in `extra` override these (argparse keeps the last)."""
    return list(map(str, ["train.py", "--data", data, "--image-folder", shapes, "--tokenizer", shapes / "tok.model",
                          "--llm-config", "tiny", "--vit-config", "tiny", "--image-size", "28", "--max-length", "64",
                          "--num-workers", "0", "--seed", SEED, "--dist-timeout", "60", "--out", out, *extra]))


def torchrun(*args) -> list[str]:
    """Two processes with gloo (torchrun picks a free port with --standalone)."""
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return _start(cmd, log, ENV, cwd=ROOT)


def run(cmd: list[str], log: Path, limit: float) -> tuple[int, float, str]:
    proc = start(cmd, log)
    try:
        return finish(proc, limit)
    finally:
        kill_session(proc)


def processes_of(tag: str) -> dict[int, str]:
    """{pid: command line} of live (non-zombie) processes whose command line contains `tag`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if tag in cmdline and state != "Z":
            found[int(entry)] = cmdline
    return found


def assert_nothing_left(tag, grace: float = 5.0) -> None:
    """A loader worker notices within a second that its parent is gone; allow that, then nothing may remain."""
    deadline = time.monotonic() + grace
    while (left := processes_of(str(tag))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left running: {left}"


def children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
        except OSError:
            pass
    return sorted(kids)


def metric_steps(out: Path) -> list[int]:
    file = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in file.read_text().splitlines()] if file.exists() else []


def first_step_samples(shapes, world_size: int, batch_size: int) -> list[list[int]]:
    """Each rank's sample indices at step 1, worked out exactly as train.py does (same data set lengths,
    same GlobalBatchSampler and seed), so a test can plant a fault where exactly one rank will read it."""
    from llava_min.data import LLaVADataset
    from llava_min.dinov2 import load_config
    from llava_min.sampler import GlobalBatchSampler

    image_tokens = load_config("tiny").image_tokens(28)
    dataset = LLaVADataset(shapes / "pretrain.json", shapes / "tok.model", shapes, image_size=28, max_length=64,
                           image_tokens=image_tokens)
    sampler = GlobalBatchSampler(dataset.lengths, batch_size * world_size, seed=SEED)
    return [sampler.local_batch(0, rank, world_size, 0, 1) for rank in range(world_size)]


def with_garbage_image(shapes, tmp_path, index: int) -> tuple[Path, str, Path]:
    """A copy of pretrain.json whose sample `index` points to an existing file of garbage bytes."""
    samples = json.loads((shapes / "pretrain.json").read_text())
    bad = tmp_path / "broken.png"
    bad.write_bytes(GARBAGE)
    samples[index]["image"] = str(bad)         # absolute: os.path.join(image_folder, it) is the path itself
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples))
    return data, samples[index]["id"], bad


# --------------------------------------------------------------------------------------------------
# Bad data

def test_bad_samples_stop_the_run_before_training_all_named(shapes, tmp_path):
    samples = json.loads((shapes / "pretrain.json").read_text())
    samples[3]["image"] = "images/missing-0003.png"
    samples[7]["conversations"][1]["from"] = "human"          # human, human: roles do not alternate
    del samples[11]["conversations"]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples))
    out = tmp_path / "out"
    rc, seconds, log = run([PY, *train_cmd(shapes, data, out)], tmp_path / "log", 60)
    assert rc != 0 and "LlavaMinError" in log, log[-3000:]
    assert f"3 of 48 samples in {data} are bad; fix or remove them" in log
    expected = [
        f"sample 3 (id 'caption-000004', {data} item 3, image {shapes}/images/missing-0003.png): image file "
        f"{shapes}/images/missing-0003.png does not exist",
        f"sample 7 (id 'caption-000008', {data} item 7, image {shapes}/images/train-000008.png): "
        "conversations[1] is from 'human' where 'gpt' was expected (turns alternate human, gpt, ...)",
        f"sample 11 (id 'caption-000012', {data} item 11, image {shapes}/images/train-000012.png): no 'conversations'",
    ]
    for line in expected:
        assert line in log, log[-3000:]
    assert metric_steps(out) == [] and "train:" not in log      # no step was run
    assert_nothing_left(f"{tmp_path}/")

    # The standalone check, run before a job, says the same without loading a model.
    check = subprocess.run([PY, "-m", "llava_min.data", "check", "--data", str(data), "--image-folder", str(shapes)],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and all(line in check.stderr for line in expected), check.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_garbage_image_fails_at_its_first_batch_naming_id_and_path(shapes, tmp_path, workers):
    index = first_step_samples(shapes, 1, 8)[0][-1]          # read in step 1
    data, sample_id, bad = with_garbage_image(shapes, tmp_path, index)
    out = tmp_path / "out"
    rc, seconds, log = run([PY, *train_cmd(shapes, data, out, "--batch-size", 8, "--max-steps", 3,
                                           "--num-workers", workers)], tmp_path / "log", 60)
    # The few lines of a run stopped by an image that does not decode (train.py BAD_IMAGE_EXIT).
    assert rc == 3 and "Traceback" not in log, log[-3000:]
    blame = r"step 1: sample \d+ \(id " + re.escape(f"'{sample_id}'") + r".* stops the run: "
    assert re.search(blame, log), log[-3000:]
    assert f"image {bad}" in log and "cannot identify image file" in log
    stopped = ("stopped before step 1: an image above does not decode; no step finished, "
               "nothing to save")
    assert stopped in log
    assert metric_steps(out) == []
    assert_nothing_left(f"{tmp_path}/")


def test_data_check_decode_finds_the_garbage_image(shapes, tmp_path):
    data, sample_id, bad = with_garbage_image(shapes, tmp_path, 5)
    check = subprocess.run([PY, "-m", "llava_min.data", "check", "--data", str(data), "--image-folder", str(shapes),
                            "--decode", "--num-workers", "2"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 1
    assert f"sample 5 (id '{sample_id}', {data} item 5, image {bad}):" in check.stderr, check.stderr
    assert "1 of 48 samples" in check.stderr


# --------------------------------------------------------------------------------------------------
# Processes that die or freeze

def test_sigkill_of_a_loader_worker_ends_the_run_naming_the_signal(shapes, tmp_path):
    out = tmp_path / "out"
    proc = start([PY, *train_cmd(shapes, shapes / "pretrain.json", out, "--batch-size", 8, "--max-steps", 100000,
                                 "--save-every", 100000, "--num-workers", 2)], tmp_path / "log")
    try:
        wait_for(lambda: len(metric_steps(out)) >= 2, 60, "two training steps", proc)
        workers = wait_for(lambda: children(proc.pid) if len(children(proc.pid)) == 2 else None, 10,
                           "two loader workers", proc)
        os.kill(workers[0], signal.SIGKILL)
        rc, seconds, log = finish(proc, 30)
        assert rc != 0 and seconds < 30
        assert f"WorkerDied: loader worker 0 (pid {workers[0]}) was killed by SIGKILL" in log, log[-3000:]
        assert "OOM killer" in log and "Fix: fewer --num-workers" in log
        assert_nothing_left(f"{tmp_path}/")
    finally:
        kill_session(proc)


def frozen_rank_report(log: str, out: Path, survivor: int, frozen: int, pid: int, timeout: float) -> str:
    """Check the surviving rank's DistTimeout (collective, timeout, the frozen rank named silent) and its
    stack file; returns the name of the collective it waited in."""
    head = re.search(rf"DistTimeout: rank {survivor}: \w+ '([^']+)' at step \d+ timed out after \d+ s "
                     rf"\(--dist-timeout {timeout:g} s\)", log)
    assert head, log[-4000:]
    assert re.search(rf"rank {frozen} \(pid {pid} on .*process silent for \d+ s \(stopped, frozen or killed\)",
                     log), log[-4000:]
    assert f"none from rank(s) {frozen}" in log
    stack = (out / "stacks" / f"rank-{survivor}.txt").read_text()
    assert "Thread MainThread" in stack and "train.py" in stack
    return head.group(1)


# torchrun SIGTERMs the other ranks when one fails and SIGKILLs them 30 s later (a stopped process ignores
# SIGTERM until then): that grace is part of the bound and of every SIGSTOP test's time.
TIMEOUT = 10


@pytest.mark.waits
def test_sigstopped_rank_at_start_up_is_named_by_the_waiting_rank(shapes, tmp_path):
    # Rank 0 freezes while it reads the data set (the 4-GPU story: one rank busy for ever, the others
    # waiting). 24,000 samples make that phase last a second or more, long enough to stop rank 0 inside it.
    samples = json.loads((shapes / "pretrain.json").read_text())
    data = tmp_path / "big.json"
    data.write_text(json.dumps([dict(s, id=f"{s['id']}-{k}") for k in range(500) for s in samples]))
    out = tmp_path / "out"
    proc = start(torchrun(*train_cmd(shapes, data, out, "--batch-size", 4, "--max-steps", 1,
                                     "--dist-timeout", TIMEOUT)), tmp_path / "log")
    try:
        # Rank 0 prints "reading data from ..." as it starts on the data and "data: ..." once they are read.
        wait_for(lambda: "reading data from" in proc.log.read_text(), 90, "rank 0 to start reading data", proc)
        pid = read_heartbeat(out, 0)["pid"]
        os.kill(pid, signal.SIGSTOP)
        assert "data:" not in proc.log.read_text(), "rank 0 was stopped too late, after reading the data"
        rc, seconds, log = finish(proc, TIMEOUT + 60)
        assert rc != 0 and seconds < TIMEOUT + 60
        frozen_rank_report(log, out, survivor=1, frozen=0, pid=pid, timeout=TIMEOUT)
        assert_nothing_left(f"{tmp_path}/")
    finally:
        kill_session(proc)


@pytest.mark.waits
def test_sigstopped_rank_mid_step_is_named_by_the_waiting_rank(shapes, tmp_path):
    out = tmp_path / "out"
    proc = start(torchrun(*train_cmd(shapes, shapes / "pretrain.json", out, "--batch-size", 4, "--max-steps", 100000,
                                     "--save-every", 100000, "--dist-timeout", TIMEOUT)), tmp_path / "log")
    try:
        wait_for(lambda: read_heartbeat(out, 1).get("step", 0) >= 2, 60, "two training steps", proc)
        pid = read_heartbeat(out, 0)["pid"]
        # Freeze rank 0 while rank 1 waits in DDP's gradient all-reduce (where most of a step's waiting happens).
        freeze_inside(pid, lambda: read_heartbeat(out, 1).get("phase", ""), lambda p: "DDP" in p and "backward" in p,
                      "DDP's gradient all-reduce")
        rc, seconds, log = finish(proc, TIMEOUT + 60)
        assert rc != 0 and seconds < TIMEOUT + 60
        assert "DDP gradient all-reduce" in frozen_rank_report(log, out, survivor=1, frozen=0, pid=pid,
                                                                timeout=TIMEOUT)
        assert_nothing_left(f"{tmp_path}/")
    finally:
        kill_session(proc)


# train.py whose data set raises on sample argv[1]: a fault the loader reports as it is.
RAISING_TRAIN = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())
from llava_min.data import LLaVADataset
faulty = int(sys.argv[1])
getitem = LLaVADataset.__getitem__
def raising_getitem(self, i):
    if i == faulty:
        raise RuntimeError("a fault injected by the test")
    return getitem(self, i)
LLaVADataset.__getitem__ = raising_getitem
sys.argv = sys.argv[2:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_rank_that_raises_ends_every_rank_promptly(shapes, tmp_path):
    # A sample that only rank 1 reads at step 1 (the sampler gives each rank its own slice) raises.
    rank0, rank1 = first_step_samples(shapes, 2, 4)
    assert rank1[0] not in rank0
    samples = json.loads((shapes / "pretrain.json").read_text())
    sample_id = samples[rank1[0]]["id"]
    script = tmp_path / "raising_train.py"
    script.write_text(RAISING_TRAIN)
    out, timeout = tmp_path / "out", 120                      # a hang would last the whole timeout
    cmd = train_cmd(shapes, shapes / "pretrain.json", out, "--batch-size", 4, "--max-steps", 3,
                    "--dist-timeout", timeout)
    rc, seconds, log = run(torchrun(script, rank1[0], *cmd), tmp_path / "log", timeout)
    assert rc != 0 and seconds < timeout / 2, f"{seconds:.0f} s\n{log[-3000:]}"
    assert re.search(r"\[rank1\]:.*SampleError: the main process \(num_workers=0\) failed on sample \d+ \(id "
                     + re.escape(f"'{sample_id}'"), log), log[-4000:]
    assert "RuntimeError: a fault injected by the test" in log
    assert read_heartbeat(out, 1)["phase"].startswith("exited: SampleError")
    # torchrun's summary blames rank 1; rank 0 was ended by torchrun's SIGTERM, not by a timeout.
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)", log.split("Root Cause (first observed failure):")[-1])
    assert "DistTimeout" not in log
    assert_nothing_left(f"{tmp_path}/")


# --------------------------------------------------------------------------------------------------
# Checkpoints and NaN

def kill_during_a_save(cmd: list[str], ckpts: Path, log: Path) -> str | None:
    """Run `cmd` and SIGKILL it the moment a save is in progress (a .tmp-step-* folder) while an older
    checkpoint is complete. Returns the unfinished folder's name, or None if the save got published first
    (the kill comes within milliseconds of the folder's creation; a save takes tens of them). Only the
    trainer is killed, as the OOM killer would: its loader worker must notice and exit by itself."""
    proc = start(cmd, log)
    try:
        tmp = None
        while proc.poll() is None and tmp is None:
            if (ckpts / "latest").exists():
                tmp = next((p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-step-")), None)
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert tmp is not None, f"the run ended before a save was caught in progress:\n{log.read_text()[-3000:]}"
        assert_nothing_left(f"{log.parent}/")
        return tmp if (ckpts / tmp).exists() else None
    finally:
        kill_session(proc)


def test_sigkill_during_checkpoint_save_keeps_the_previous_one_and_resume_finishes(shapes, tmp_path):
    from llava_min.checkpoint import checkpoint_problem

    for attempt in range(3):                   # a busy machine may delay the kill past the rename
        out = tmp_path / f"out{attempt}"
        cmd = [PY, *train_cmd(shapes, shapes / "pretrain.json", out, "--batch-size", 8, "--max-steps", 12,
                              "--save-every", 2, "--num-workers", 1)]
        ckpts = out / "checkpoints"
        if tmp := kill_during_a_save(cmd, ckpts, tmp_path / f"log{attempt}"):
            break
    else:
        raise AssertionError("three saves were published before the kill landed")
    previous = (ckpts / "latest").read_text().strip()
    step = int(previous.split("-")[1])
    assert step < int(re.match(r"\.tmp-step-(\d+)-", tmp).group(1))   # the kill hit a newer save
    assert checkpoint_problem(ckpts / previous) is None

    rc, seconds, log = run(cmd + ["--resume"], tmp_path / "resume.log", 90)
    assert rc == 0, log[-3000:]
    assert f"resumed from {ckpts / previous} at step {step}" in log
    assert metric_steps(out) == list(range(1, 13))
    assert (ckpts / "latest").read_text().strip() == "step-000012" and checkpoint_problem(ckpts / "step-000012") is None
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")], "the killed save's leftovers remain"
    assert (out / "llava_config.json").exists()


@pytest.fixture(scope="module")
def nan_skip_run(shapes, tmp_path_factory):
    """A learning rate of 1e30 blows the weights up at step 1; every later step's loss is NaN."""
    d = tmp_path_factory.mktemp("nan")
    rc, seconds, log = run([PY, *train_cmd(shapes, shapes / "pretrain.json", d / "out", "--batch-size", 8,
                                           "--max-steps", 3, "--lr", 1e30, "--train", "all", "--nan", "skip")],
                           d / "log", 60)
    return rc, log, d / "out"


def test_nan_skip_logs_each_skipped_step_and_goes_on(nan_skip_run):
    rc, log, out = nan_skip_run
    assert rc == 0, log[-3000:]
    for step in (2, 3):
        assert re.search(rf"step {step}: loss is nan \(NaN/inf\)\. Samples of this rank's batches: \['caption-\d+'.*"
                         r" -- skipping this step", log), log[-3000:]
    assert metric_steps(out) == [1]                # skipped steps are not recorded as trained


def test_nan_skip_still_saves_the_model(nan_skip_run):
    rc, log, out = nan_skip_run
    assert rc == 0 and "done: 3 steps" in log
    assert (out / "llava_config.json").exists() and (out / "checkpoints" / "latest").exists()
    # The skipped steps moved the schedule too: the learning rate stays that of the step.
    state = torch.load(out / "checkpoints" / "step-000003" / "training_state.pt", weights_only=True)
    assert state["schedule"]["step"] == 3
