"""Images that exist but do not decode (a truncated PNG, a zero-byte file), met mid-run by a
loader worker.

Proves, through train.py as users start it (real loader workers, the tiny presets, a 48-image
shapes data set):
  * the data set hands such a sample on with every label masked and zero pixels for each of its
    images, so that unpacked and packed batches still have one image per placeholder (a two-image
    sample included);
  * with --skip-bad-samples the run ends, each dropped sample is logged once with its file,
    metrics.jsonl counts them per step and in total and names the files, and every step's loss
    equals that of a reference run on the good data whose train.py masks those samples' labels (a
    wrapper around the data set, not the code under test), with --train all: the placeholder
    pixels reach no loss and no gradient;
  * without the flag the run saves the last finished step and stops with a few lines (the sample,
    the file, what PIL said, the three ways on), no traceback, exit status 3;
    `--resume --skip-bad-samples` then finishes it with the same metrics as the run that skipped
    from the start;
  * under torchrun (2 ranks, gloo), where only rank 1 meets the bad image, rank 0 stops after the
    same step, promptly (no hang until --dist-timeout), or with the flag both go on.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _procs import finish, kill_session, start
from llava_min import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaMinError
from llava_min.data import LLaVADataset, collate, collate_packed
from llava_min.dinov2 import load_config
from llava_min.sampler import GlobalBatchSampler

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SEED = 3
STEPS = 12          # one epoch of 48 samples at a global batch of 4: every sample is read once
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
IMAGE_TOKENS = load_config("tiny").image_tokens(28)

# train.py with the labels of the samples whose ids are in argv[1] masked: the reference loss.
MASKED_TRAIN = """
import json, os, runpy, sys
sys.path.insert(0, os.getcwd())
from llava_min import IGNORE_INDEX
from llava_min.data import LLaVADataset
masked = set(json.loads(sys.argv[1]))
getitem = LLaVADataset.__getitem__
def masked_getitem(self, i):
    item = getitem(self, i)
    if item["id"] in masked:
        item["labels"] = item["labels"].clone().fill_(IGNORE_INDEX)
    return item
LLaVADataset.__getitem__ = masked_getitem
sys.argv = sys.argv[2:]
runpy.run_path("train.py", run_name="__main__")
"""


# ------------------------------------------------------------------------------------------------
# Data: good shapes, then copies with bad images planted at known steps

@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """48 shapes images at 28 px, a tokenizer, and good.json: pretrain.json with sample 9 made a
    two-image sample (its own image and sample 10's)."""
    d = tmp_path_factory.mktemp("shapes")
    make = [PY, "data/make_shapes.py", "--out", d, "--n-train", "48", "--n-test", "8",
            "--seed", "1", "--image-size", "28"]
    tokenizer = [PY, "-m", "llava_min.tokenizer", "train", "--data", d / "pretrain.json",
                 "--vocab-size", "400", "--out", d / "tok.model"]
    for cmd in (make, tokenizer):
        subprocess.run(list(map(str, cmd)), cwd=ROOT, env=ENV, check=True, capture_output=True,
                       timeout=120)
    samples = json.loads((d / "pretrain.json").read_text())
    samples[9]["image"] = [samples[9]["image"], samples[10]["image"]]
    samples[9]["conversations"][0]["value"] = "<image> and <image>\nDescribe the first picture."
    (d / "good.json").write_text(json.dumps(samples))
    return d


def steps_of(shapes, world_size: int) -> list[list[list[int]]]:
    """[step][rank] -> the sample indices train.py gives that rank at that step (the same data
    set, sampler and seed; a bad image changes no length)."""
    dataset = LLaVADataset(shapes / "good.json", shapes / "tok.model", shapes, image_size=28,
                           max_length=64, image_tokens=IMAGE_TOKENS)
    sampler = GlobalBatchSampler(dataset.lengths, 4, seed=SEED)
    return [[sampler.local_batch(step, rank, world_size, 0, 1) for rank in range(world_size)]
            for step in range(STEPS)]


def plant(shapes, folder: Path, bad: dict[int, list[str]]) -> Path:
    """good.json with {sample index: its image list} replaced; returns the new file."""
    samples = json.loads((shapes / "good.json").read_text())
    for index, files in bad.items():
        samples[index]["image"] = files
        if len(files) == 1:
            samples[index]["image"] = files[0]
    data = folder / "bad.json"
    data.write_text(json.dumps(samples))
    return data


def broken_files(shapes, folder: Path) -> tuple[str, str]:
    """A PNG cut in half, and a zero-byte file (absolute paths: joined to --image-folder they stay
    as they are)."""
    raw = (shapes / "images" / "train-000001.png").read_bytes()
    truncated = folder / "truncated.png"
    truncated.write_bytes(raw[:len(raw) // 2])
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    return str(truncated), str(empty)


@pytest.fixture(scope="module")
def planted(shapes, tmp_path_factory):
    """The bad data set: at step 3 a truncated PNG, at step 7 a zero-byte file, and the two-image
    sample with its second image zero bytes. Returns (data file, {sample id: bad file}, first bad
    step)."""
    folder = tmp_path_factory.mktemp("planted")
    truncated, empty = broken_files(shapes, folder)
    plan = steps_of(shapes, 1)
    step_of = {i: step + 1 for step, ranks in enumerate(plan) for i in ranks[0]}
    two_images = json.loads((shapes / "good.json").read_text())[9]
    assert step_of[9] > 3, "the two-image sample is read before step 3; pick another"
    first = plan[2][0][0]
    later = next(i for i in plan[6][0] if i != 9)
    bad_files = {first: [truncated], later: [empty], 9: [two_images["image"][0], empty]}
    data = plant(shapes, folder, bad_files)
    samples = json.loads(data.read_text())
    bad = {samples[first]["id"]: truncated, samples[later]["id"]: empty, samples[9]["id"]: empty}
    return data, bad, 3


def train_cmd(shapes, data, out, *extra) -> list[str]:
    """train.py on the tiny presets, every part trained, 2 loader workers; `extra` overrides."""
    cmd = ["train.py", "--data", data, "--image-folder", shapes, "--tokenizer", shapes / "tok.model",
           "--llm-config", "tiny", "--vit-config", "tiny", "--image-size", "28",
           "--max-length", "64", "--train", "all", "--batch-size", 4, "--max-steps", STEPS,
           "--save-every", 100, "--num-workers", 2, "--seed", SEED, "--dist-timeout", 60,
           "--out", out, *extra]
    return list(map(str, cmd))


def run(cmd: list[str], log: Path, limit: float = 120) -> tuple[int, float, str]:
    proc = start(cmd, log, ENV, cwd=ROOT)
    try:
        rc, seconds, text = finish(proc, limit)
    finally:
        kill_session(proc)
    # The progress bar redraws with carriage returns: one line per redraw.
    return rc, seconds, text.replace("\r", "\n")


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_records(a: list[dict], b: list[dict]) -> None:
    """Equal metrics but the timings."""
    timing = {"seconds", "tokens_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in a] == \
           [{k: v for k, v in r.items() if k not in timing} for r in b]


# ------------------------------------------------------------------------------------------------
# The data set's marked item

def test_marked_item_masks_labels_and_keeps_one_image_per_placeholder(shapes, tmp_path):
    truncated, empty = broken_files(shapes, tmp_path)
    first_of_9 = json.loads((shapes / "good.json").read_text())[9]["image"][0]
    data = plant(shapes, tmp_path, {0: [truncated], 9: [first_of_9, empty]})
    kwargs = dict(image_size=28, max_length=64, image_tokens=IMAGE_TOKENS)
    marked = LLaVADataset(data, shapes / "tok.model", shapes, decode_errors="mark", **kwargs)
    items = [marked[0], marked[9], marked[1]]
    for item, files, path in ((items[0], 1, truncated), (items[1], 2, empty)):
        assert (item["labels"] == IGNORE_INDEX).all()
        assert item["pixel_values"].shape == (files, 3, 28, 28) and not item["pixel_values"].any()
        assert item["bad"]["file"] == path and item["bad"]["id"] == item["id"]
    assert "truncated" in items[0]["bad"]["error"]
    assert "cannot identify image file" in items[1]["bad"]["error"]
    assert items[2]["bad"] is None and (items[2]["labels"] != IGNORE_INDEX).any()
    packed = collate_packed(items, capacity=128, image_tokens=IMAGE_TOKENS)
    for batch in (collate(items), packed):
        placeholders = int((batch["input_ids"] == IMAGE_TOKEN_INDEX).sum())
        assert batch["pixel_values"].shape[0] == placeholders == 4
        assert sorted(b["file"] for b in batch["bad"]) == sorted([truncated, empty])
    # The default, for every other reader (held-out loss, eval), raises, naming the sample.
    raising = LLaVADataset(data, shapes / "tok.model", shapes, **kwargs)
    named = r"sample 0 \(id 'caption-000001'.*cannot decode image"
    with pytest.raises(LlavaMinError, match=named):
        raising[0]


# ------------------------------------------------------------------------------------------------
# One process, loader workers

@pytest.fixture(scope="module")
def skipped(shapes, planted, tmp_path_factory):
    """The run with --skip-bad-samples on the bad data: (out, log)."""
    data, bad, _ = planted
    out = tmp_path_factory.mktemp("skip") / "out"
    rc, _, log = run([PY, *train_cmd(shapes, data, out, "--skip-bad-samples")], out.parent / "log")
    assert rc == 0, log[-4000:]
    return out, log


def test_skip_bad_samples_reports_them_and_loses_only_their_labels(shapes, planted, skipped,
                                                                   tmp_path):
    data, bad, _ = planted
    out, log = skipped
    # Logged once each, with the sample's id and the file; counted at the end.
    for sample_id, path in bad.items():
        lines = [line for line in log.splitlines() if f"(id '{sample_id}'" in line]
        assert len(lines) == 1, log[-4000:]
        assert "left out of the loss (--skip-bad-samples)" in lines[0]
        assert f"{path}: cannot decode image" in lines[0]
    assert "bad images: 3 samples left out of the loss" in log
    got = records(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert sum(r["bad_samples"] for r in got) == 3 and got[-1]["bad_samples_total"] == 3
    assert sorted(f for r in got for f in r.get("bad_images", [])) == sorted(bad.values())
    assert got[2]["bad_samples"] == 1 and got[6]["bad_samples"] >= 1
    assert got[1]["bad_samples_total"] == 0 and got[2]["bad_samples_total"] == 1

    # The reference: the good data, those samples' labels masked by a wrapper around the data set.
    ref = tmp_path / "ref"
    script = tmp_path / "masked_train.py"
    script.write_text(MASKED_TRAIN)
    ref_cmd = [PY, script, json.dumps(sorted(bad)), *train_cmd(shapes, shapes / "good.json", ref)]
    rc, _, ref_log = run(ref_cmd, tmp_path / "ref.log")
    assert rc == 0, ref_log[-4000:]
    expected = [r["loss"] for r in records(ref)]
    assert [r["loss"] for r in got] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # The masking matters: the plain good run differs from step 3 on.
    plain = tmp_path / "plain"
    plain_cmd = [PY, *train_cmd(shapes, shapes / "good.json", plain, "--max-steps", 3)]
    rc, _, plain_log = run(plain_cmd, tmp_path / "plain.log")
    assert rc == 0, plain_log[-4000:]
    assert records(plain)[2]["loss"] != pytest.approx(expected[2], rel=1e-5)


def test_without_the_flag_the_run_saves_stops_and_resumes_with_it(shapes, planted, skipped,
                                                                  tmp_path):
    data, bad, first_step = planted
    out = tmp_path / "out"
    cmd = train_cmd(shapes, data, out)
    rc, seconds, log = run([PY, *cmd], tmp_path / "log")
    assert rc == 3, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
    ckpt = out / "checkpoints" / f"step-{first_step - 1:06d}"
    saved = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert saved == [ckpt.name]
    assert [r["step"] for r in records(out)] == list(range(1, first_step))
    truncated = bad[next(iter(bad))]
    message = log[log.index(f"step {first_step}: sample "):].splitlines()
    said = f"stops the run: {truncated}: cannot decode image (OSError: image file is truncated)"
    assert said in message[0]
    tail = log[log.index(f"stopped before step {first_step}"):].strip()
    assert len(tail.splitlines()) == 4, tail
    stopped = f"stopped before step {first_step}: an image above does not decode; checkpoint {ckpt}"
    assert tail.startswith(stopped + ". Ways on:")
    assert f"python -m llava_min.data check --data {data} --image-folder {shapes} --decode" in tail
    command = " ".join([PY, *cmd])
    assert command + " --resume\n" in tail
    assert tail.endswith(command + " --resume --skip-bad-samples")

    rc, _, log = run([PY, *cmd, "--resume", "--skip-bad-samples"], tmp_path / "resume.log")
    assert rc == 0 and f"resumed from {ckpt} at step {first_step - 1}" in log, log[-4000:]
    same_records(records(out), records(skipped[0]))


# ------------------------------------------------------------------------------------------------
# Two ranks: only rank 1 meets the bad image

@pytest.mark.parametrize("skip", [False, True])
def test_under_torchrun_only_rank_1_meets_it(shapes, tmp_path, skip):
    plan = steps_of(shapes, 2)
    truncated, _ = broken_files(shapes, tmp_path)
    index = plan[2][1][0]                                   # rank 1's first sample of step 3
    assert index not in plan[2][0]
    data = plant(shapes, tmp_path, {index: [truncated]})
    out = tmp_path / "out"
    extra = ["--batch-size", 2, "--max-steps", 4, "--num-workers", 1]
    if skip:
        extra.append("--skip-bad-samples")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *train_cmd(shapes, data, out, *extra)]
    rc, seconds, log = run(cmd, tmp_path / "log", limit=60)
    assert seconds < 40, f"{seconds:.0f} s: a hang?\n{log[-4000:]}"
    # Said once, by the rank that met it.
    assert log.count("step 3: sample ") == 1, log[-4000:]
    assert "[rank 1] step 3: sample " in log
    assert "DistTimeout" not in log
    if skip:
        assert rc == 0, log[-4000:]
        got = records(out)
        assert [r["bad_samples"] for r in got] == [0, 0, 1, 0]
        assert got[2]["bad_images"] == [truncated]
        return
    assert rc != 0, log[-4000:]
    assert "stopped before step 3: an image above does not decode; checkpoint" in log
    assert [r["step"] for r in records(out)] == [1, 2]
    assert (out / "checkpoints" / "step-000002").is_dir()
    # The one traceback, and the summary, are torchrun's own, for any rank that exits non-zero.
    assert log.count("Traceback") == 1 and "exitcode  : 3" in log
