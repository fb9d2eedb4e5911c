"""`python -m llava_min.doctor` runs as users run it: one process, and under real `torchrun` with 2 gloo ranks.

Proves: the one-process report covers versions, GPUs, /dev/shm, the open-file limit, the environment and
the ranks, and exits 0 on this machine; under torchrun the preflight barrier and the checked all-reduce pass
on both ranks and a bandwidth figure is printed; torchrun variables that contradict each other make it
exit 1 with a line naming them, before it tries to join anything.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], env_extra: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_one_process_report():
    r = run(["-m", "llava_min.doctor"], {"NCCL_DEBUG": "INFO"})
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for expected in ("versions     Python", "torch", "gpus", "/dev/shm", "open-file limit",
                     "environment  NCCL_DEBUG=INFO", "ranks        one process", "doctor: 0 failure(s)"):
        assert expected in out, f"{expected!r} missing from:\n{out}"


def test_under_torchrun_with_two_ranks():
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "-m", "llava_min.doctor", "--timeout", "30", "--bandwidth-mib", "4"], timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "[rank 0] ok    ranks        rank 0 of 2, local rank 0 of 2" in out
    assert "[rank 0] ok    collectives  barrier and all_reduce across 2 ranks (gloo)" in out
    assert "all_reduce of 4 MiB" in out and "bus bandwidth" in out
    assert "doctor: 0 failure(s) across all ranks" in out
    assert "[rank 1] info" not in out        # the other ranks print only their warnings and failures


def test_contradictory_rank_variables_fail_before_joining():
    r = run(["-m", "llava_min.doctor"], {"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                         "MASTER_PORT": "1"}, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL  ranks        rank 3: RANK 3 is not below WORLD_SIZE 2" in r.stdout
    assert "doctor: 1 failure(s)" in r.stdout
