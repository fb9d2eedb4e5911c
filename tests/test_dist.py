"""llava_min.dist (+ llava_min.tools.hang) under real `torchrun` with gloo: a hung or failing rank
ends the job quickly and says why.

Proves, each with two real worker processes (this file is also the worker script):
  * a rank frozen with SIGSTOP makes the job end within --dist-timeout + 60 s, non-zero, with a message that
    names the collective, the step, the timeout and the frozen rank; the surviving rank's stack is on disk;
  * a rank that raises makes every rank exit promptly (long before the timeout);
  * check_consistent names the field and the differing rank, on every rank;
  * a barrier that one rank never reaches names that rank; a barrier given its own, longer timeout (a
    checkpoint save) waits past --dist-timeout, and when that runs out too its message names the barrier;
  * `kill -USR2` on a rank blocked inside a collective dumps every rank's stack and the run goes on;
and, in one process: the collectives are identities, heartbeats land in OUT/heartbeats, and
`collective()` turns a peer failure inside a block (gloo's RuntimeError, a DistError) into a named DistTimeout
while other errors pass, with the hang tool attached or not. With several images per sample (make_pairs.py's
data) and micro-batches without any image, train.py on 2 processes (DDP, FSDP) equals 1 process.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _procs import finish, kill_session, start, wait_for  # noqa: E402
from llava_min import dist  # noqa: E402
from llava_min.tools import hang  # noqa: E402


# --------------------------------------------------------------------------------------------------
# The worker side: `python -m torch.distributed.run ... tests/test_dist.py SCENARIO OUT TIMEOUT`

def worker(scenario: str, out: Path, timeout: float) -> None:
    torch.set_num_threads(1)
    d = dist.setup(timeout_s=timeout)
    hang.attach(d, out)
    try:
        # All_reduce every 0.2 s until OUT/stop appears (or 300 steps)
        if scenario == "steps":
            for step in range(1, 300):
                d.heartbeat(step, "forward")
                # Rank 0 mostly waits inside the all_reduce
                time.sleep(0.2 if d.rank == 0 else 0.6)
                dist.all_reduce(d, torch.ones(1), what=f"loss sum at step {step}")
                if (out / "stop").exists():
                    break
            d.log(f"finished at step {step}")
        elif scenario == "raise":
            for step in range(1, 300):
                d.heartbeat(step, "forward")
                if d.rank == 1 and step == 3:
                    raise ValueError("rank 1 broke on purpose at step 3")
                dist.all_reduce(d, torch.ones(1), what=f"loss sum at step {step}")
                time.sleep(0.1)
        elif scenario == "mismatch":
            dist.check_consistent(d, {"samples": 1000 + d.rank, "max_steps": 10, "config_hash": "abc"})
        elif scenario == "barrier":
            if d.rank == 1:
                d.heartbeat(1, "preparing data")
                time.sleep(30)
            dist.barrier(d, what="data ready")
        elif scenario == "save":           # rank 0 "saves" for 2.5 x the timeout, then for ever
            if d.rank == 0:
                d.heartbeat(1, "saving")
                time.sleep(2.5 * timeout)
            dist.barrier(d, what=f"checkpoint save at step 1 into {out}", timeout_s=4 * timeout)
            d.log("waited for the save")
            if d.rank == 0:
                d.heartbeat(2, "saving again")
                time.sleep(30)
            dist.barrier(d, what=f"checkpoint save at step 2 into {out}", timeout_s=2 * timeout)
    finally:
        dist.teardown(d)


# --------------------------------------------------------------------------------------------------
# The test side

def launch(scenario: str, out: Path, timeout: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, scenario, str(out), str(timeout)]
    return start(cmd, out.parent / f"{scenario}.log", env)


def reached(out: Path, rank: int, step: int) -> dict | None:
    """The rank's heartbeat once it has reached `step`."""
    beat = hang.read_heartbeat(out, rank)
    return beat if beat.get("step", 0) >= step else None


@pytest.mark.waits
def test_sigstopped_rank_ends_the_job_with_a_named_timeout(tmp_path):
    out, timeout = tmp_path / "out", 4
    proc = launch("steps", out, timeout)
    try:
        beat = wait_for(lambda: reached(out, 1, 2), 40, "rank 1 to reach step 2", proc)
        os.kill(beat["pid"], signal.SIGSTOP)
        rc, seconds, log = finish(proc, timeout + 60)
    finally:
        kill_session(proc)
    assert rc != 0
    assert seconds < timeout + 60
    assert "DistTimeout" in log and "timed out after" in log and f"--dist-timeout {timeout} s" in log, log[-3000:]
    assert "all_reduce 'loss sum at step" in log
    assert f"rank 1 (pid {beat['pid']}" in log and "process silent" in log, log[-3000:]
    stack = (out / "stacks" / "rank-0.txt").read_text()
    assert "Thread MainThread" in stack and "all_reduce" in stack and "in worker" in stack
    assert "none from rank(s) 1" in log


def test_a_rank_that_raises_ends_every_rank_promptly(tmp_path):
    out = tmp_path / "out"
    proc = launch("raise", out, 120)         # a hang would last the whole 120 s timeout
    rc, seconds, log = finish(proc, 60)
    assert rc != 0
    assert "rank 1 broke on purpose at step 3" in log
    assert seconds < 30, f"took {seconds:.0f} s"
    assert hang.read_heartbeat(out, 1)["phase"].startswith("exited: ValueError")


def test_check_consistent_names_rank_and_field_on_every_rank(tmp_path):
    out = tmp_path / "out"
    rc, _, log = finish(launch("mismatch", out, 30), 60)
    assert rc != 0
    for rank in (0, 1):
        assert f"LlavaMinError: rank {rank}: the ranks disagree at start-up" in log, log[-3000:]
    assert log.count("'samples' differs on rank(s) 1 from rank 0 (rank 0: 1000; rank 1: 1001)") == 2
    assert "max_steps" not in log.split("LlavaMinError")[1].split("\n")[1]


def test_barrier_names_the_rank_that_never_came(tmp_path):
    out = tmp_path / "out"
    rc, seconds, log = finish(launch("barrier", out, 2), 40)
    assert rc != 0 and seconds < 25
    assert "barrier 'data ready'" in log
    assert "rank(s) 1 did not reach this barrier within 2 s" in log, log[-3000:]
    assert "rank 1 (pid" in log and "preparing data" in log


def test_barrier_with_its_own_timeout_waits_for_a_save_and_names_it(tmp_path):
    # The first save takes 2.5 x --dist-timeout, the barrier allows 4 x
    out, timeout = tmp_path / "out", 2
    rc, seconds, log = finish(launch("save", out, timeout), 60)
    assert rc != 0 and seconds < 45, log[-3000:]
    assert "[rank 1] waited for the save" in log, log[-3000:]
    assert re.search(rf"rank 1: barrier 'checkpoint save at step 2 into {re.escape(str(out))}' at step \d+ timed out "
                     rf"after \d+ s \(--dist-timeout {timeout} s, this wait {2 * timeout} s\)", log), log[-3000:]
    assert "rank 0 (pid" in log and "saving again" in log


def test_usr2_dumps_every_rank_without_stopping(tmp_path):
    out = tmp_path / "out"
    proc = launch("steps", out, 30)
    try:
        beat = wait_for(lambda: reached(out, 0, 2), 40, "rank 0 to reach step 2", proc)
        # Rank 0 spends most of its time blocked in all_reduce
        os.kill(beat["pid"], signal.SIGUSR2)
        stacks = [out / "stacks" / f"rank-{r}.txt" for r in (0, 1)]
        wait_for(lambda: all(f.exists() for f in stacks), 10, "both stack files", proc)
        for f in stacks:
            text = f.read_text()
            assert "SIGUSR2 to rank 0" in text and "in worker" in text and "Thread MainThread" in text
        step = hang.read_heartbeat(out, 1)["step"]
        wait_for(lambda: reached(out, 1, step + 2), 20, "steps after the dump", proc)
        (out / "stop").touch()
        rc, _, log = finish(proc, 30)
    finally:
        kill_session(proc)
    assert rc == 0, log[-3000:]
    assert "[rank 0] finished at step" in log and "[rank 1] finished at step" in log


def test_one_process(tmp_path):
    d = dist.setup(timeout_s=5)
    hang.attach(d, tmp_path)
    try:
        assert (d.rank, d.world_size, d.is_distributed) == (0, 1, False)
        t = torch.tensor([3.0])
        assert dist.all_reduce(d, t, what="x") is t and t.item() == 3.0
        assert dist.all_gather_object(d, {"a": 1}) == [{"a": 1}]
        dist.barrier(d)
        dist.check_consistent(d, {"samples": 10})
        d.heartbeat(7, "forward")
        d.forensics.write_heartbeat()
        beat = hang.read_heartbeat(tmp_path, 0)
        assert (beat["step"], beat["phase"], beat["pid"]) == (7, "forward", os.getpid())
        # collective() names distributed failures inside a block (DDP's backward) and lets others
        # through
        with pytest.raises(RuntimeError, match="^shape mismatch$"):
            with dist.collective(d, "DDP gradient all-reduce at step 7"):
                raise RuntimeError("shape mismatch")
        with pytest.raises(dist.DistTimeout, match="collective 'DDP gradient all-reduce at step 7' at step 7 "
                                                   "failed after .* Connection closed by peer"):
            with dist.collective(d, "DDP gradient all-reduce at step 7"):      # as gloo words it
                raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                                   "[127.0.0.1]:1234")
        assert "Connection closed" not in (tmp_path / "stacks" / "rank-0.txt").read_text()
        assert "DDP gradient all-reduce at step 7' failed" in (tmp_path / "stacks" / "rank-0.txt").read_text()
        with pytest.raises(dist.DistTimeout, match="Ranks last seen:\n  rank 0 \\(pid"):
            with dist.collective(d, "NCCL all-reduce"):
                raise dist.tdist.DistBackendError("NCCL error: remote process exited")
    finally:
        dist.teardown(d)
    assert hang.read_heartbeat(tmp_path, 0)["phase"] == "exited"
    assert d.forensics.watcher.is_alive() is False


def test_without_the_hang_tool():
    d = dist.setup(timeout_s=5)
    try:
        d.heartbeat(3, "forward")
        with pytest.raises(dist.DistTimeout, match="collective 'x' at step 3 failed after .*: NCCL error\n"
                                                   "Ranks last seen:\n  rank 0: step 3, in collective 'x'"):
            with dist.collective(d, "x"):
                raise dist.tdist.DistNetworkError("NCCL error")
    finally:
        dist.teardown(d)


# --------------------------------------------------------------------------------------------------
# Several images per sample: train.py on 2 processes equals 1, with DDP and with FSDP

def test_two_processes_match_one_with_multi_image_data_and_image_less_micro_batches(tmp_path):
    """make_pairs.py's data (two images a sample, mixed with one-image samples) plus 8 text-only
    samples: the epoch's text-only global batch gives each rank a micro-batch with no image at all
    (ViT and projector still in the graph), and the 2-process runs (DDP, FSDP) match the 1-process
    run, losses and weights."""
    from test_train import PY, free_port, losses, run, weights
    from llava_min.data import LLaVADataset
    from llava_min.sampler import GlobalBatchSampler
    data = tmp_path / "pairs"
    run([PY, "data/make_pairs.py", "--out", data, "--n-images", "24", "--n-test-images", "24", "--n-train", "12",
         "--n-test", "4", "--image-size", "28"])
    samples = json.loads((data / "finetune.json").read_text())
    samples += [{"id": f"text-{i}", "conversations": [{"from": "human", "value": f"Say {i}."},
                                                       {"from": "gpt", "value": f"{i}"}]} for i in range(8)]
    (data / "mixed.json").write_text(json.dumps(samples))
    run([PY, "-m", "llava_min.tokenizer", "train", "--data", data / "pretrain.json", data / "mixed.json",
         "--vocab-size", "400", "--out", data / "tok.model"])
    ds = LLaVADataset(data / "mixed.json", data / "tok.model", data, image_size=28, max_length=96, image_tokens=4)
    assert ds.stats["several_images"] == 12 and ds.stats["text_only"] == 8 and len(ds) == 32
    # One epoch of 4 steps of 8: one of them text-only, so on 2 ranks, 2 micro-batches without an
    # image.
    sampler = GlobalBatchSampler(ds.lengths, 8, seed=3)
    steps = [sampler.global_batch(step) for step in range(4)]
    assert sum(all(ds.lengths[i] < 0 for i in batch) for batch in steps) == 1

    def args(out, *extra):
        return ["train.py", "--data", data / "mixed.json", "--image-folder", data, "--tokenizer", data / "tok.model",
                "--llm-config", "tiny", "--vit-config", "tiny", "--image-size", "28", "--max-length", "96",
                "--num-workers", "0", "--seed", "3", "--dist-timeout", "60", "--train", "all", "--max-steps", "4",
                "--lr", "1e-3", "--out", out, *map(str, extra)]

    one = tmp_path / "one"
    report = run([PY, *args(one, "--batch-size", 8)]).stdout
    assert "32 of 32 samples used (24 with an image, 12 of them with several, 8 text-only)" in report
    torchrun = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    ref = losses(one)
    assert len(ref) == 4 and ref[0] != ref[-1]
    for extra in ([], ["--fsdp"]):
        two = tmp_path / f"two{'-'.join(extra)}"
        run([*torchrun, "--master_port", str(free_port()), *args(two, "--batch-size", 4, *extra)], timeout=300)
        assert losses(two) == pytest.approx(ref, abs=1e-5)
        w1, w2 = weights(one), weights(two)
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]))
