"""train.py --fsdp (FSDP2) end to end: real torchrun with gloo on the CPU, tiny models, real files.

Proves: FSDP on 2 processes gives the same per-step losses and final weights as 1 process without sharding
(1e-5, fp32) with the ViT trained (--train all), with gradient accumulation and checkpointing together, and
with LoRA on a frozen ViT (kept outside the sharded graph); rank 0 alone reads the weights and broadcasts them,
rank 1 builds on the meta device and holds its shards only (and the frozen ViT); its checkpoints hold one DCP
file per rank and no frozen tensor; SIGKILL after a checkpoint, then --resume: bit-identical final weights under
FSDP; a checkpoint saved by 2 FSDP processes resumed by 1 process without --fsdp continues the same losses; a
rank frozen with SIGSTOP in the middle of a step ends the job within --dist-timeout + 60 s, the waiting rank
naming the FSDP collective and the silent rank, nothing left running; bench/gpu.py --smoke --fsdp runs the
sharded step.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _procs import finish, freeze_inside, kill_session, start, wait_for
from llava_min.tools.hang import read_heartbeat
from test_faults import assert_nothing_left, frozen_rank_report
from test_train import losses, run, stage1_args, weights

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
LORA = ["--train", "projector,llm", "--lora-r", "4", "--lora-dropout", "0"]   # no dropout: same masks on any split


def torchrun(*args) -> list:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    run([PY, "data/make_shapes.py", "--out", d, "--n-train", "48", "--n-test", "8", "--seed", "1", "--image-size", "28"])
    run([PY, "-m", "llava_min.tokenizer", "train", "--data", d / "pretrain.json", "--vocab-size", "400",
         "--out", d / "tok.model"])
    return d


def assert_same_weights(a, b, tol=1e-5):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < tol, worst


def resume_from(src: Path, step: int, dest: Path) -> None:
    """dest as a run stopped right after src's checkpoint at `step` leaves it: that checkpoint, metrics to it."""
    name = f"step-{step:06d}"
    shutil.copytree(src / "checkpoints" / name, dest / "checkpoints" / name)
    (dest / "checkpoints" / "latest").write_text(name + "\n")
    (dest / "metrics.jsonl").write_text("".join((src / "metrics.jsonl").read_text().splitlines(True)[:step]))


def assert_loaded_from_rank0(stdout: str, vit_sharded: bool) -> None:
    """Each rank's "FSDP load:" line: rank 0 read the weights on the CPU, rank 1 built on meta and holds its
    shards only (about half of the model; plus the whole frozen ViT when the ViT is outside the sharded graph)."""
    found = dict((int(r), (on, int(held.replace(",", "")), int(whole.replace(",", "")))) for r, on, held, whole in
                 re.findall(r"\[rank (\d)\] FSDP load: built on (\w+); holds ([\d,]+) of the model's ([\d,]+) bytes",
                            stdout))
    assert sorted(found) == [0, 1], stdout[-3000:]
    assert found[0][0] == "cpu" and found[1][0] == "meta", found
    (_, held0, whole), (_, held1, _) = found[0], found[1]
    assert held0 + held1 >= whole and held1 < (0.55 if vit_sharded else 0.95) * whole, found


def test_fsdp_on_two_processes_matches_one_process(shapes, tmp_path):
    common = ["--train", "all", "--max-steps", "3", "--lr", "1e-3"]
    one, two, accum = tmp_path / "one", tmp_path / "two", tmp_path / "accum"
    run([PY, *stage1_args(shapes, one, "--batch-size", 8, *common)])
    p = run(torchrun(*stage1_args(shapes, two, "--batch-size", 4, "--save-every", 2, "--fsdp", *common)), timeout=300)
    assert_loaded_from_rank0(p.stdout, vit_sharded=True)
    run(torchrun(*stage1_args(shapes, accum, "--batch-size", 2, "--grad-accum", 2, "--grad-checkpointing", "--fsdp",
                              *common)), timeout=300)
    ref = losses(one)
    assert len(ref) == 3 and ref[0] != ref[-1]
    for out in (two, accum):
        assert losses(out) == pytest.approx(ref, abs=1e-5)
        assert_same_weights(one, out)
    # The sharded checkpoint: one DCP file per rank, the trained tensors only (the ViT's unused last block and
    # its final norm are frozen: absent), and the RNG state of both ranks.
    ckpt = two / "checkpoints" / "step-000002"
    assert sorted(p.name for p in (ckpt / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    state = torch.load(ckpt / "training_state.pt", weights_only=True)
    assert state["sharded"] == "shards" and "trainable" not in state and len(state["rng"]) == 2
    assert set(state["frozen"]) == {"vit"}

    # Saved by 2 FSDP processes, resumed by 1 without --fsdp: step 3 as in the 1-process run.
    cut = tmp_path / "cut"
    resume_from(two, 2, cut)
    p = run([PY, *stage1_args(shapes, cut, "--batch-size", 8, *common, "--resume")])
    assert "saved by 2 processes, now 1" in p.stdout
    assert losses(cut) == pytest.approx(ref, abs=1e-5)
    assert_same_weights(one, cut)


def test_fsdp_lora_and_sigkill_then_resume_is_bit_identical(shapes, tmp_path):
    common = [*LORA, "--max-steps", "6", "--save-every", "2", "--lr", "1e-3"]
    one, full, cut = tmp_path / "one", tmp_path / "full", tmp_path / "cut"
    run([PY, *stage1_args(shapes, one, "--batch-size", 8, *common)])
    fsdp_cmd = lambda out, *more: torchrun(*stage1_args(shapes, out, "--batch-size", 4, "--fsdp", *common, *more))  # noqa
    assert_loaded_from_rank0(run(fsdp_cmd(full), timeout=300).stdout, vit_sharded=False)
    assert losses(full) == pytest.approx(losses(one), abs=1e-5)
    assert_same_weights(one, full)

    # SIGKILL of the whole job (torchrun and both ranks) as soon as a checkpoint is published.
    proc = start(fsdp_cmd(cut), tmp_path / "cut.log", ENV, cwd=ROOT)
    latest = cut / "checkpoints" / "latest"
    try:
        wait_for(lambda: latest.exists(), 180, "the first checkpoint", proc)
    finally:
        kill_session(proc)
    assert_nothing_left(f"{cut}")                       # SIGKILL lands a moment later on the ranks than on torchrun
    killed_at = latest.read_text().strip()
    assert killed_at < "step-000006", "the run finished before the kill"
    p = run(fsdp_cmd(cut, "--resume"), timeout=300)
    assert f"resumed from {cut / 'checkpoints' / killed_at}" in p.stdout
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from {killed_at}"
    assert losses(cut) == losses(full)


TIMEOUT = 10


@pytest.mark.waits
def test_sigstopped_rank_mid_step_under_fsdp_is_named(shapes, tmp_path):
    out = tmp_path / "out"
    proc = start(torchrun(*stage1_args(shapes, out, "--batch-size", 4, "--max-steps", 100000, "--save-every", 100000,
                                       "--train", "all", "--fsdp", "--dist-timeout", TIMEOUT)), tmp_path / "log", ENV,
                 cwd=ROOT)
    try:
        wait_for(lambda: read_heartbeat(out, 1).get("step", 0) >= 2, 60, "two training steps", proc)
        pid = read_heartbeat(out, 0)["pid"]
        # Stop rank 0 while rank 1 waits inside FSDP's forward/backward.
        freeze_inside(pid, lambda: read_heartbeat(out, 1).get("phase", ""), lambda p: "FSDP all-gather" in p,
                      "FSDP's forward/backward")
        rc, seconds, log = finish(proc, TIMEOUT + 60)
        assert rc != 0 and seconds < TIMEOUT + 60
        what = frozen_rank_report(log, out, survivor=1, frozen=0, pid=pid, timeout=TIMEOUT)
        assert what.startswith("forward/backward (FSDP all-gather / reduce-scatter)"), what
        assert_nothing_left(f"{tmp_path}/")
    finally:
        kill_session(proc)


def test_gpu_bench_smoke_fsdp():
    p = subprocess.run([PY, "bench/gpu.py", "--smoke", "--fsdp"], cwd=ROOT, capture_output=True, text=True,
                       timeout=180, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "FSDP" in p.stdout and "tokens/s" in p.stdout and "memory estimate" in p.stdout, p.stdout
