"""train.py / finetune.py end to end, as users run them: real processes, real torchrun (gloo), real files.

Proves: a 2-process run gives the same per-step losses as 1 process with the same global batch (and as
gradient accumulation); a run SIGKILLed after a checkpoint and resumed ends with bit-identical weights;
gradient checkpointing leaves the loss unchanged; a stage-1 output feeds finetune.py (which inherits its
settings) and loads with LLaVA.from_pretrained; LoRA fine-tuning saves merged weights in the official
layout; a reused output folder is refused; a NaN loss stops the run naming the step and the samples.
What a run writes at real size: checkpoints hold the trained state and no frozen tensor; frozen parts in OUT
are hard links to (or copies of, or a symbolic link to) their source files, so OUT outlives a moved source
in link and copy mode and says what is missing in ref mode; trained parts keep their source's dtype; files
take their mode from the umask; a changed frozen source is refused at --resume, naming the file; a flag given
abbreviated on the command line wins over the setting inherited from --init-from.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def run(args, timeout=240, env=None, check=True):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=e)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small shapes data set and a tokenizer trained on it (built once for the module)."""
    d = tmp_path_factory.mktemp("shapes")
    run([PY, "data/make_shapes.py", "--out", d, "--n-train", "48", "--n-test", "8", "--seed", "1", "--image-size", "28"])
    run([PY, "-m", "llava_min.tokenizer", "train", "--data", d / "pretrain.json", d / "finetune.json",
         "--vocab-size", "400", "--out", d / "tok.model"])
    return d


def stage1_args(shapes, out, *extra):
    return ["train.py", "--data", shapes / "pretrain.json", "--image-folder", shapes, "--tokenizer", shapes / "tok.model",
            "--llm-config", "tiny", "--vit-config", "tiny", "--image-size", "28", "--max-length", "64",
            "--num-workers", "0", "--seed", "3", "--dist-timeout", "60", "--out", out, *map(str, extra)]


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(folder) -> dict[str, torch.Tensor]:
    state = {}
    for part in ("llm", "vit", "projector"):
        for f in sorted((Path(folder) / part).glob("*.safetensors")):
            state.update({f"{part}/{k}": v for k, v in load_file(f).items()})
    return state


def test_two_processes_match_one_process_and_accumulation(shapes, tmp_path):
    common = ["--train", "all", "--max-steps", "3", "--lr", "1e-3"]
    one = tmp_path / "one"
    run([PY, *stage1_args(shapes, one, "--batch-size", 8, *common)])
    accum = tmp_path / "accum"
    run([PY, *stage1_args(shapes, accum, "--batch-size", 4, "--grad-accum", 2, *common)])
    two = tmp_path / "two"
    run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         *stage1_args(shapes, two, "--batch-size", 4, *common)], timeout=300)
    ref = losses(one)
    assert len(ref) == 3 and ref[0] != ref[-1]          # the model did learn something between steps
    assert losses(accum) == pytest.approx(ref, abs=1e-5)
    assert losses(two) == pytest.approx(ref, abs=1e-5)
    w1, w2 = weights(one), weights(two)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


def test_sigkill_after_checkpoint_then_resume_is_bit_identical(shapes, tmp_path):
    common = ["--train", "projector,llm", "--lora-r", "4", "--max-steps", "8", "--save-every", "2",
              "--batch-size", "8", "--num-workers", "1"]
    full = tmp_path / "full"
    run([PY, *stage1_args(shapes, full, *common)])

    cut = tmp_path / "cut"
    proc = subprocess.Popen([PY, *map(str, stage1_args(shapes, cut, *common))], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = cut / "checkpoints" / "latest"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step-000004":
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)                 # the trainer and its loader worker, at once
    proc.wait()
    assert latest.exists(), "no checkpoint was written before the kill"
    killed_at = latest.read_text().strip()
    run([PY, *stage1_args(shapes, cut, *common, "--resume")])
    assert killed_at < "step-000008"
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from {killed_at}"
    assert losses(cut) == losses(full)                  # metrics.jsonl rewritten from the checkpoint on


def test_gradient_checkpointing_same_loss(shapes, tmp_path):
    common = ["--train", "all", "--max-steps", "2", "--batch-size", "8"]
    run([PY, *stage1_args(shapes, tmp_path / "plain", *common)])
    run([PY, *stage1_args(shapes, tmp_path / "ckpt", *common, "--grad-checkpointing")])
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)


def test_stage1_feeds_finetune_with_lora_and_loads(shapes, tmp_path):
    s1 = tmp_path / "s1"
    run([PY, *stage1_args(shapes, s1, "--max-steps", "2", "--batch-size", "8")])
    s2 = tmp_path / "s2"
    p = run([PY, "finetune.py", "--init-from", s1, "--data", shapes / "finetune.json", "--image-folder", shapes,
             "--num-workers", "0", "--max-steps", "3", "--batch-size", "8", "--lora-r", "4", "--lr", "1e-2",
             "--out", s2])
    assert "inherited" in p.stdout and "image_size=28" in p.stdout and "max_length=64" in p.stdout
    from llava_min import LLaVA
    model = LLaVA.from_pretrained(s2)
    assert model.config.image_size == 28
    before, after = weights(s1), weights(s2)
    assert set(before) == set(after)                    # LoRA merged away: the official keys only
    changed = [k for k in before if k.startswith("llm/") and not torch.equal(before[k], after[k])]
    assert any(".attention.wqkv." in k for k in changed)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vit/"))  # ViT stayed frozen

    # The output folder serves the inference CLIs as the README shows them.
    answers = {}
    for batch in ("1", "4"):
        out = run([PY, "-m", "llava_min.eval", "--model", s2, "--data", shapes / "test.json", "--image-folder", shapes,
                   "--batch-size", batch, "--answers", tmp_path / f"answers-{batch}.jsonl"])
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        assert summary["total"] == 8 and 0.0 <= summary["accuracy"] <= 1.0
        rows = [json.loads(line) for line in (tmp_path / f"answers-{batch}.jsonl").read_text().splitlines()]
        assert summary["correct"] == sum(r["correct"] for r in rows)
        answers[batch] = [r["prediction"] for r in rows]
    assert answers["1"] == answers["4"]                 # left-padded batches answer as one prompt at a time
    image = shapes / json.loads((shapes / "test.json").read_text())[0]["image"]
    one = run([PY, "-m", "llava_min.chat", "--model", s2, "--image", image, "What shape is this?"])
    p = subprocess.run([PY, "-m", "llava_min.chat", "--model", s2, "--image", image], cwd=ROOT, text=True,
                       input="What shape is this?\nHow many shapes are there?\n", capture_output=True, timeout=120)
    assert p.returncode == 0 and p.stdout.splitlines()[0] == one.stdout.strip() and len(p.stdout.splitlines()) == 2
    bad = run([PY, "-m", "llava_min.chat", "--model", s2, "--image", tmp_path / "missing.png", "hi"], check=False)
    assert bad.returncode != 0 and "missing.png" in bad.stderr and "Traceback" not in bad.stderr


def test_reused_output_folder_is_refused(shapes, tmp_path):
    out = tmp_path / "o"
    run([PY, *stage1_args(shapes, out, "--max-steps", "1", "--batch-size", "8")])
    p = run([PY, *stage1_args(shapes, out, "--max-steps", "1", "--batch-size", "8")], check=False)
    assert p.returncode != 0 and "--resume" in p.stderr


def test_nan_loss_stops_with_step_and_samples(shapes, tmp_path):
    p = run([PY, *stage1_args(shapes, tmp_path / "nan", "--max-steps", "3", "--batch-size", "8", "--lr", "1e30",
                              "--train", "all")], check=False)
    assert p.returncode != 0
    assert "NaN" in p.stderr and "step " in p.stderr and "caption-" in p.stderr


def test_resume_on_another_world_size_continues_the_same_run(shapes, tmp_path):
    """Stopped after step 2 on 1 process, resumed on 2 with --zero (same global batch): steps 3-4 as if never
    stopped. The plain optimizer state loads into the sharded one, whose step and save are collectives."""
    common = ["--train", "all", "--max-steps", "4", "--save-every", "2", "--lr", "1e-3"]
    full = tmp_path / "full"
    run([PY, *stage1_args(shapes, full, "--batch-size", 8, *common)])
    # The state a run stopped right after its step-2 checkpoint leaves: that checkpoint, metrics to step 2.
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000002", cut / "checkpoints" / "step-000002")
    (cut / "checkpoints" / "latest").write_text("step-000002\n")
    (cut / "metrics.jsonl").write_text("".join((full / "metrics.jsonl").read_text().splitlines(True)[:2]))
    p = run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             *stage1_args(shapes, cut, "--batch-size", 4, *common, "--resume", "--zero")], timeout=300)
    assert "resumed from" in p.stdout and "saved by 1 processes, now 2" in p.stdout
    assert losses(cut) == pytest.approx(losses(full), abs=1e-5)
    a, b = weights(full), weights(cut)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


# --------------------------------------------------------------------------------------------------
# What a run writes: checkpoints of trained state only, frozen parts never re-encoded, modes from the umask

@pytest.fixture(scope="module")
def sources(shapes, tmp_path_factory):
    """Part folders as a user passes them with --llm / --vit / --projector: a stage-1 output's parts, with the
    LLM and the projector stored in bf16, as InternLM2 and XTuner release theirs."""
    base = tmp_path_factory.mktemp("sources")
    run([PY, *stage1_args(shapes, base / "s1", "--max-steps", "1", "--batch-size", "8")])
    for part in ("llm", "vit", "projector"):
        shutil.copytree(base / "s1" / part, base / "models" / part)
    for part in ("llm", "projector"):
        f = base / "models" / part / "model.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    return base / "models"


def from_sources(shapes, out, src, *extra):
    args = stage1_args(shapes, out, "--batch-size", "8", *extra)
    i = args.index("--llm-config")
    return args[:i] + ["--llm", str(src / "llm"), "--vit", str(src / "vit"), "--projector", str(src / "projector")] \
        + args[i + 4:]


def test_checkpoints_hold_trained_state_only_and_frozen_parts_are_linked(shapes, sources, tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o027)                               # group may read, others not: neither 0600 nor 0644
    try:
        run([PY, *from_sources(shapes, out, sources, "--max-steps", "2", "--save-every", "1", "--dtype", "bfloat16")])
    finally:
        os.umask(old)
    steps = sorted((out / "checkpoints").glob("step-*"))
    assert [s.name for s in steps] == ["step-000001", "step-000002"]
    for s in steps:
        assert sorted(p.name for p in s.iterdir()) == ["COMPLETE", "training_state.pt"]
        state = torch.load(s / "training_state.pt", weights_only=True)
        assert state["trainable"] and all(k.startswith("projector.") for k in state["trainable"])
        assert set(state["frozen"]) == {"llm", "vit"} and "model.safetensors" in state["frozen"]["llm"]["files"]
    # Frozen parts: hard links to the source files (same inode: not a byte re-encoded or copied).
    for part in ("llm", "vit"):
        assert (out / part / "model.safetensors").stat().st_ino == (sources / part / "model.safetensors").stat().st_ino
    # The trained projector: written once, in its source's dtype (bf16), and changed by training.
    src_proj, out_proj = (load_file(f / "projector" / "model.safetensors") for f in (sources, out))
    assert all(v.dtype == torch.bfloat16 for v in out_proj.values())
    assert any(not torch.equal(src_proj[k], out_proj[k]) for k in src_proj)
    written = [out / "args.json", out / "metrics.jsonl", out / "llava_config.json", out / "tokenizer.model",
               out / "projector" / "model.safetensors", out / "projector" / "config.json",
               out / "checkpoints" / "latest", *(s / n for s in steps for n in ("COMPLETE", "training_state.pt"))]
    assert {str(f.relative_to(out)): oct(f.stat().st_mode & 0o777) for f in written} == \
        {str(f.relative_to(out)): "0o640" for f in written}
    # The output outlives its sources: moved away, OUT still loads, its LLM equal to the source bit for bit.
    moved = sources.with_name("moved")
    os.rename(sources, moved)
    try:
        from llava_min import LLaVA
        model = LLaVA.from_pretrained(out)
        ref = load_file(moved / "llm" / "model.safetensors")
        got = model.llm.state_dict()
        assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], ref[k]) for k in ref)
    finally:
        os.rename(moved, sources)


def test_frozen_parts_copied_or_referenced(shapes, sources, tmp_path):
    from llava_min import LlavaMinError, LLaVA
    src = tmp_path / "models"
    shutil.copytree(sources, src)
    run([PY, *from_sources(shapes, tmp_path / "copy", src, "--max-steps", "1", "--save-frozen", "copy")])
    run([PY, *from_sources(shapes, tmp_path / "ref", src, "--max-steps", "1", "--save-frozen", "ref")])
    copied, original = tmp_path / "copy" / "llm" / "model.safetensors", src / "llm" / "model.safetensors"
    assert copied.stat().st_ino != original.stat().st_ino and copied.read_bytes() == original.read_bytes()
    assert (tmp_path / "ref" / "llm").is_symlink() and (tmp_path / "ref" / "llm").resolve() == (src / "llm").resolve()
    shutil.rmtree(src)                                  # the sources are gone
    LLaVA.from_pretrained(tmp_path / "copy")
    with pytest.raises(LlavaMinError, match=r"llm.*(no longer exists|is missing)"):
        LLaVA.from_pretrained(tmp_path / "ref")


def test_resume_refuses_a_changed_frozen_source_naming_the_file(shapes, sources, tmp_path):
    src = tmp_path / "models"
    shutil.copytree(sources, src)
    out = tmp_path / "out"
    args = from_sources(shapes, out, src, "--max-steps", "2", "--save-every", "1")
    run([PY, *args])
    shutil.rmtree(out / "checkpoints" / "step-000002")  # as if killed after step 1
    (out / "checkpoints" / "latest").write_text("step-000001\n")
    f = src / "vit" / "model.safetensors"
    state = load_file(f)
    k = sorted(state)[0]
    state[k] = state[k] + 1                             # same names, shapes and size: other weights
    save_file(state, f, metadata={"format": "pt"})
    p = run([PY, *args, "--resume"], check=False)
    assert p.returncode != 0 and str(f) in p.stderr and "differs from the one this checkpoint" in p.stderr


def test_abbreviated_flag_wins_over_the_inherited_setting(shapes, tmp_path):
    s1 = tmp_path / "s1"
    run([PY, *stage1_args(shapes, s1, "--max-steps", "1", "--batch-size", "8")])
    p = run([PY, "finetune.py", "--init-from", s1, "--data", shapes / "finetune.json", "--image-folder", shapes,
             "--num-workers", "0", "--max-steps", "1", "--batch-size", "8", "--max-len", "48", "--out", tmp_path / "s2"])
    assert "image_size=28" in p.stdout and "max_length=" not in p.stdout
    assert json.loads((tmp_path / "s2" / "args.json").read_text())["max_length"] == 48
