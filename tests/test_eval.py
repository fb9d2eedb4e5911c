"""python -m llava_min.eval end to end: test.json exact match as CONTRACT defines it, and
VLMEvalKit TSVs.

test.json: lower-cased, surrounding punctuation and white space stripped (inner punctuation kept);
a malformed test file is refused naming the item; an item with a list of images gives the model
every image, a question without tags one <image> per image in front. TSVs, with a tiny random model
in real processes: predictions.tsv holds every row with the input's columns (no image), the
prediction, what was extracted and whether it hit, and scoring it again alone (--predictions) gives
the same scores.json; VLMEvalKit-style prediction files (CSV with extra columns) are scored to the
hand-derived figures of tests/test_vlmeval.py; a missing prediction or an image that does not
decode stops the run naming file, index and column, or is counted with --skip-bad; batch size 1 and
4 answer alike; a run SIGKILLed in the middle and started again with the same --out answers only
the rest and ends with the predictions of an uninterrupted run; two ranks under torchrun (gloo)
give the predictions and scores of one process.
"""
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _bench_tsv import (MCQ_COLUMNS, VQA_COLUMNS, YORN_COLUMNS, mcq_rows, png_b64, pope_rows,
                        tiny_model, vqa_rows, write_tsv)
from _procs import finish, kill_session, start, wait_for
from llava_min import LlavaMinError
from llava_min.chat import prompt_ids
from llava_min.eval import load_test_set, main as eval_main, normalise

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.mark.parametrize("raw,want", [("Red", "red"), ("  red.\n", "red"), ('"Top-left!"', "top-left"),
                                      ("two shapes.", "two shapes"), ("", "")])
def test_normalise(raw, want):
    assert normalise(raw) == want


def test_inner_punctuation_still_counts():
    assert normalise("top-left") != normalise("top left")


def test_bad_test_file_names_the_item(tmp_path):
    f = tmp_path / "test.json"
    f.write_text(json.dumps([{"id": "a", "question": "q", "answer": "x"}, {"id": "b", "question": "q"}]))
    with pytest.raises(LlavaMinError, match=r"item 1 \(id 'b'\) lacks \['answer'\]"):
        load_test_set(f)


# TSVs with a tiny model

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tok, folder = tiny_model(tmp_path_factory.mktemp("model"))
    return folder


def run_eval(*args, check=True, timeout=120):
    cmd = [sys.executable, "-m", "llava_min.eval", *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def eval_here(*args) -> str:
    """The same command in this process (no interpreter start-up): its stdout; errors raise. One
    thread, as the subprocesses get (OMP_NUM_THREADS=1): two threads on matrices this small only
    wait for each other."""
    buf = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(buf):
            eval_main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    return buf.getvalue()


def read_tsv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_mmbench_end_to_end_and_scoring_alone_agree(model, tmp_path):
    rows, _ = mcq_rows()
    data = write_tsv(tmp_path / "MMBench_DEV_EN_tiny.tsv", MCQ_COLUMNS, rows)
    p = run_eval("--model", model, "--data", data, "--batch-size", "4")
    out = model / "eval" / "MMBench_DEV_EN_tiny"                 # the default --out
    last = json.loads(p.stdout.strip().splitlines()[-1])
    scores = json.loads((out / "scores.json").read_text())
    assert list(scores) == ["Overall", "CP", "LR", "future_prediction", "image_emotion"]
    assert all(last[k] == v for k, v in scores.items())
    assert last["rows"] == 13 and last["scored"] == 4
    assert "MMBench_DEV_EN_tiny (multiple choice, circular; 4 scored; fractions)" in p.stdout
    written = read_tsv_rows(out / "predictions.tsv")
    assert [r["index"] for r in written] == [str(r["index"]) for r in rows]
    columns = [c for c in MCQ_COLUMNS if c != "image"]
    assert list(written[0]) == columns + ["prediction", "extracted", "hit", "group_hit"]
    assert all(r["extracted"] in "ABCDZ" and r["hit"] in ("0", "1") for r in written)

    printed = eval_here("--data", data, "--predictions", out / "predictions.tsv",
                        "--out", tmp_path / "rescored")
    assert json.loads((tmp_path / "rescored" / "scores.json").read_text()) == scores, printed
    assert read_tsv_rows(tmp_path / "rescored" / "predictions.tsv") == written


def test_vlmevalkit_prediction_files_score_as_derived(tmp_path):
    rows, predictions = mcq_rows()
    data = write_tsv(tmp_path / "MMBench_DEV_EN_tiny.tsv", MCQ_COLUMNS, rows)
    # VLMEvalKit's inference output: the input's columns but image, then prediction; here as CSV
    pred = tmp_path / "llava_MMBench_DEV_EN_tiny.csv"
    with open(pred, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([c for c in MCQ_COLUMNS if c != "image"] + ["prediction"])
        for row in rows:
            cells = [row.get(c, "") for c in MCQ_COLUMNS if c != "image"]
            writer.writerow(cells + [predictions[row["index"]]])
    eval_here("--data", data, "--predictions", pred, "--out", tmp_path / "a")
    assert json.loads((tmp_path / "a" / "scores.json").read_text()) == \
        {"Overall": 0.25, "CP": 0.5, "LR": 0.0, "future_prediction": 0.0, "image_emotion": 0.5}

    rows, predictions = pope_rows()
    data = write_tsv(tmp_path / "POPE_tiny.tsv", YORN_COLUMNS, rows)
    pred = write_tsv(tmp_path / "pope_pred.tsv", ["index", "prediction"],
                     [{"index": k, "prediction": v} for k, v in predictions.items() if k != 5])
    with pytest.raises(LlavaMinError, match=r"no prediction for 1 row\(s\) .*\(index 5\)"):
        eval_here("--data", data, "--predictions", pred)
    eval_here("--data", data, "--predictions", pred, "--skip-bad", "--out", tmp_path / "b")
    scores = json.loads((tmp_path / "b" / "scores.json").read_text())
    # without row 5 (an FN): TP 2, FP 3, FN 1 over 8 exploded rows; acc 4 of 8
    assert scores["skipped"] == 1 and scores["acc"] == 50.0
    assert scores["recall"] == pytest.approx(200 / 3)


def test_bad_image_stops_or_is_skipped(model, tmp_path):
    rows, _ = vqa_rows()
    rows[3]["image"] = "iVBORw0KGgo" + "A" * 80       # a PNG signature, then nothing usable
    data = write_tsv(tmp_path / "TextVQA_bad.tsv", VQA_COLUMNS, rows)
    with pytest.raises(LlavaMinError, match=r"TextVQA_bad\.tsv: row with index 4 \(data row 4\), column 'image': the "
                                            r"image does not decode"):
        eval_here("--model", model, "--data", data, "--out", tmp_path / "a", "--max-new-tokens", "3")
    out = eval_here("--model", model, "--data", data, "--out", tmp_path / "b",
                    "--max-new-tokens", "3", "--skip-bad")
    assert json.loads((tmp_path / "b" / "scores.json").read_text())["skipped"] == 1
    assert "skipped 1 bad row(s)" in out
    written = read_tsv_rows(tmp_path / "b" / "predictions.tsv")
    assert [bool(r["skipped"]) for r in written] == [False, False, False, True, False, False]


def test_batch_size_does_not_change_the_answers(model, tmp_path):
    rows, _ = pope_rows()
    # a prompt of another length
    rows[1]["question"] = "Is there a dog in the image? Look closely at the left side of it."
    data = write_tsv(tmp_path / "POPE_tiny.tsv", YORN_COLUMNS, rows)
    preds = []
    for bs in (1, 4):
        eval_here("--model", model, "--data", data, "--out", tmp_path / f"bs{bs}", "--batch-size", bs,
                  "--num-workers", "0" if bs == 1 else "2")
        written = read_tsv_rows(tmp_path / f"bs{bs}" / "predictions.tsv")
        preds.append([r["prediction"] for r in written])
    assert preds[0] == preds[1]


def long_vqa(tmp_path, n=40) -> Path:
    rows = [{"index": k, "question": f"What is written on sign {k}?", "answer": ["stop"] * 10,
             "image": png_b64((k * 6, 50, 90)) if k == 0 else "0"} for k in range(n)]
    return write_tsv(tmp_path / "TextVQA_long.tsv", VQA_COLUMNS, rows)


def test_killed_run_resumes_with_the_same_out(model, tmp_path):
    data = long_vqa(tmp_path)
    args = ["--model", model, "--data", data, "--batch-size", "2", "--max-new-tokens", "120",
            "--num-workers", "0"]
    eval_here(*args, "--out", tmp_path / "whole")
    whole = read_tsv_rows(tmp_path / "whole" / "predictions.tsv")

    out = tmp_path / "killed"
    partial = out / "predictions.partial" / "rank-0.jsonl"
    proc = start([sys.executable, "-m", "llava_min.eval", *args, "--out", out], tmp_path / "killed.log", ENV,
                 cwd=ROOT)
    try:
        def two_batches():
            return partial.exists() and partial.read_text().count("\n") >= 4

        wait_for(two_batches, 60, "two batches", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        kill_session(proc)
    answered = partial.read_text().count("\n")
    assert 4 <= answered < 40, "the run finished before it was killed: the test proves nothing"
    with open(partial, "a") as f:
        f.write('{"index": "39", "predic')                           # a write torn by the kill
    printed = eval_here(*args, "--out", out)
    assert f"{answered} row(s) answered by an earlier run; {40 - answered} to go" in printed
    assert read_tsv_rows(out / "predictions.tsv") == whole
    assert partial.read_text().count("\n") == 40 and partial.read_text().endswith("\n")

    # another file, the same --out
    other = write_tsv(tmp_path / "TextVQA_long.tsv", VQA_COLUMNS, [])
    with pytest.raises(LlavaMinError, match="holds predictions of another run"):
        eval_here("--model", model, "--data", other, "--out", out)


def test_two_ranks_under_torchrun_equal_one_process(model, tmp_path):
    rows, _ = mcq_rows()
    data = write_tsv(tmp_path / "MMBench_tiny.tsv", MCQ_COLUMNS, rows)
    eval_here("--model", model, "--data", data, "--out", tmp_path / "one", "--batch-size", "3")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "llava_min.eval", "--model", model, "--data", data, "--out", tmp_path / "two", "--batch-size", "3",
           "--num-workers", "1", "--dist-timeout", "60"]
    rc, _, log = finish(start(cmd, tmp_path / "torchrun.log", ENV, cwd=ROOT), 120)
    assert rc == 0, log[-3000:]
    assert sorted(p.name for p in (tmp_path / "two" / "predictions.partial").glob("rank-*")) == \
        ["rank-0.jsonl", "rank-1.jsonl"]
    for name in ("scores.json", "predictions.tsv"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name


# test.json and chat with several images

def multi_image_encoding_available(model) -> bool:
    from llava_min.tokenizer import Tokenizer
    return prompt_ids(Tokenizer(model / "tokenizer.model"), "q", 2).count(-200) == 2


def test_test_json_with_image_lists(model, tmp_path):
    if not multi_image_encoding_available(model):
        pytest.skip("data.py's encode_conversation keeps one <image> tag per turn (no multi-image "
                    "encoding yet)")
    from PIL import Image
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (28, 28), colour).save(tmp_path / name)
    items = [{"id": 1, "image": ["a.png", "b.png"], "question": "Same colour?", "answer": "no"},
             {"id": 2, "image": ["a.png", "b.png"], "question": "Is <image> redder than <image>?", "answer": "yes"},
             {"id": 3, "image": "a.png", "question": "Colour?", "answer": "red"}]
    (tmp_path / "test.json").write_text(json.dumps(items))
    p = subprocess.run([sys.executable, "-m", "llava_min.eval", "--model", model, "--data", tmp_path / "test.json",
                        "--image-folder", tmp_path, "--answers", tmp_path / "answers.jsonl"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["total"] == 3
    chat = subprocess.run([sys.executable, "-m", "llava_min.chat", "--model", model, "--image", tmp_path / "a.png",
                           "--image", tmp_path / "b.png", "Same colour?"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr[-3000:]


def test_image_tags_are_kept_or_added(model):
    from llava_min.chat import with_image_tags
    assert with_image_tags("q", 2) == "<image>\n<image>\nq"
    assert with_image_tags("is <image> like <image>?", 2) == "is <image> like <image>?"
    assert with_image_tags("q", 0) == "q"
    with pytest.raises(LlavaMinError, match="1 <image> tag"):
        with_image_tags("<image> q", 2)
