"""The benchmark scripts still run (no timing is asserted: benchmarks are not tests). bench/gpu.py is meant for
a lent GPU; its --smoke form runs the same code path on the CPU in seconds, so a change that breaks it shows
here rather than in a scarce GPU session. The CPU benches run in their shortest form and must print their
ratios; generate.py also asserts inside that llava-min and transformers produce identical tokens."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args, timeout=180) -> str:
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_gpu_bench_smoke():
    out = run_bench("bench/gpu.py", "--smoke")
    assert "tokens/s" in out and "memory estimate" in out


@pytest.mark.parametrize("args, words", [
    (["bench/train_step.py", "--smoke", "--repeats", "1"], ["loss llava-min", "speed ratio llava-min / transformers"]),
    (["bench/generate.py", "--smoke", "--new-tokens", "3", "--batch", "2", "--repeats", "1"],
     ["identical tokens: True", "decoding per token"]),
    (["bench/memory.py", "--smoke"], ["transformers / llava-min", "checkpointing on / off"]),
    (["bench/loader.py", "--samples", "48", "--repeats", "1", "--workers", "0", "2"], ["ours / torch"]),
    (["bench/scale.py", "startup", "--smoke"], ["LLaVADataset / json.load: time"]),
    (["bench/packing.py", "--smoke"], ["tokens/s packed / padded", "padding"]),
    (["bench/eval.py", "--smoke", "--threads", "1"],
     ["same predictions: True", "batch 16 / batch 1", "TextVQA_bench"]),
])
def test_cpu_benches_run_and_print_their_ratios(args, words):
    out = run_bench(*args)
    assert all(w in out for w in words), out[-3000:]
