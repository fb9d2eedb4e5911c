"""The benchmark scripts still run (no timing is asserted: benchmarks are not tests). bench/gpu.py is meant for
a lent GPU; its --smoke form runs the same code path on the CPU in seconds, so a change that breaks it shows
here rather than in a scarce GPU session."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_smoke():
    p = subprocess.run([sys.executable, "bench/gpu.py", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tokens/s" in p.stdout and "memory estimate" in p.stdout
