"""The synthetic shapes data set (data/make_shapes.py).

Proves that the command line gives byte-identical files for the same seed (and different ones for
another seed); that every answer, caption and test answer agrees with what is actually in the
pixels (colour, shape, count and cell are re-derived from the PNGs, not taken from the generator);
that shapes stay clear of the border that DINOv2's centre crop removes; that the files have the
LLaVA / eval layouts the training and evaluation scripts read (captions for stage 1, multi-turn and
text-only samples for stage 2); and that no held-out image is pixel-identical to a training image,
even when such repeats are likely. The multiple-choice samples of stage 2 are in LLaVA-1.5's prompt
and their letters name the right answer; MMBench_shapes.tsv reads as a circular VLMEvalKit MMBench
file whose every rotation keeps the right answer and whose images are the held-out PNGs.
"""
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "data" / "make_shapes.py"
_spec = importlib.util.spec_from_file_location("make_shapes", SCRIPT)
make_shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_shapes)

FILES = ("pretrain.json", "finetune.json", "test.json", "scenes.json", "MMBench_shapes.tsv")


def run_cli(out, *args):
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=60)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    result = run_cli(out, "--n-train", "150", "--n-test", "40", "--seed", "3")
    assert result.returncode == 0, result.stderr
    return out


def test_same_seed_same_bytes_other_seed_differs(shapes, tmp_path):
    again = tmp_path / "again"
    assert run_cli(again, "--n-train", "150", "--n-test", "40", "--seed", "3").returncode == 0
    first = tree_bytes(shapes)
    second = tree_bytes(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []

    other = tmp_path / "other"
    assert run_cli(other, "--n-train", "150", "--n-test", "40", "--seed", "4").returncode == 0
    assert (other / "finetune.json").read_bytes() != first["finetune.json"]

    # a smaller run into the same folder leaves no images of the larger one behind
    assert run_cli(again, "--n-train", "20", "--n-test", "5", "--seed", "3").returncode == 0
    assert len(list((again / "images").glob("*.png"))) == 25


# --------------------------------------------------------------------------------------------------
# what the pixels say

def read_pixels(path: Path) -> dict:
    """Colour, shape, count and cells of a shapes image, from its pixels alone."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    size = rgb.shape[0]
    cell = size // 2
    outer = size // 16 + 1
    foreground = (rgb != make_shapes.BACKGROUND).any(axis=-1)            # (H, W)
    # clear of the image border (DINOv2's crop removes size/16 per edge) and of the cell borders
    border = np.ones_like(foreground)
    border[outer:size - outer, outer:size - outer] = False
    border[cell - 1:cell + 1, :] = border[:, cell - 1:cell + 1] = True
    assert not (foreground & border).any(), f"{path}: a shape touches the border or two cells"

    colours = {tuple(int(v) for v in c) for c in rgb[foreground]}
    assert len(colours) == 1, f"{path}: expected one flat shape colour, got {colours}"
    colour = {tuple(v): k for k, v in make_shapes.COLOURS.items()}[colours.pop()]
    shapes = set()
    regions = []
    for index, region in enumerate(make_shapes.REGIONS):
        row, col = divmod(index, 2)
        mask = foreground[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell]
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        # share of its bounding box that the shape fills: square 1, circle ~pi/4, triangle ~1/2
        fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        shapes.add("square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle")
        regions.append(region)
    assert len(shapes) == 1, f"{path}: shapes of several kinds {shapes}"
    return {"colour": colour, "shape": shapes.pop(), "count": len(regions), "regions": regions}


def expected_answer(question: str, truth: dict) -> tuple[str, str]:
    """(kind, answer) for one of the data set's questions, from the pixel truth."""
    question = question.replace("<image>", "").strip()
    if question in ("What colour is the shape?", "What colour are the shapes?"):
        assert question.endswith("shapes?") == (truth["count"] > 1)
        return "colour", truth["colour"]
    if question in ("What shape is this?", "What shape are these?"):
        assert question.endswith("these?") == (truth["count"] > 1)
        return "shape", truth["shape"]
    if question == "How many shapes are there?":
        return "count", {1: "one", 2: "two", 3: "three"}[truth["count"]]
    match = re.fullmatch(r"Where is the (\w+) (\w+)\?", question)
    assert match, f"unexpected question {question!r}"
    assert match.groups() == (truth["colour"], truth["shape"]) and truth["count"] == 1
    return "position", truth["regions"][0]


def test_every_answer_matches_the_pixels(shapes):
    truth = {p: read_pixels(shapes / p) for p in json.loads((shapes / "scenes.json").read_text())["images"]}
    scenes = json.loads((shapes / "scenes.json").read_text())["images"]
    for image, scene in scenes.items():  # the kept metadata agrees with the pixels too
        assert (scene["colour"], scene["shape"], scene["count"]) == \
            (truth[image]["colour"], truth[image]["shape"], truth[image]["count"])
        assert [o["region"] for o in scene["objects"]] == truth[image]["regions"]

    for sample in json.loads((shapes / "pretrain.json").read_text()):
        human, gpt = sample["conversations"]
        t = truth[sample["image"]]
        assert human["value"].startswith("<image>\n")
        assert human["value"][len("<image>\n"):] in make_shapes.CAPTION_PROMPTS
        words = {1: "one", 2: "two", 3: "three"}[t["count"]]
        assert gpt["value"].startswith(f"{words} {t['colour']} {t['shape']}"), (sample["id"], gpt, t)
        assert re.findall(r"(?:top|bottom)-(?:left|right)", gpt["value"]) == t["regions"], sample["id"]

    kinds = set()
    for sample in json.loads((shapes / "finetune.json").read_text()):
        turns = sample["conversations"]
        assert [m["from"] for m in turns] == ["human", "gpt"] * (len(turns) // 2)
        if "image" not in sample:
            continue
        if sample["id"].startswith("mcq-"):
            question, options = read_mcq(turns[0]["value"])
            kind, answer = expected_answer(question, truth[sample["image"]])
            assert options["ABCD".index(turns[1]["value"])] == answer, sample["id"]
            assert sorted(options) == sorted(make_shapes.CHOICES[kind])
            kinds.add(f"mcq-{kind}")
            continue
        for human, gpt in zip(turns[::2], turns[1::2]):
            kind, answer = expected_answer(human["value"], truth[sample["image"]])
            assert gpt["value"] == answer, (sample["id"], human, gpt)
            kinds.add(kind)
    mcq_kinds = {f"mcq-{k}" for k in make_shapes.QUESTION_KINDS}
    assert kinds == {"colour", "shape", "count", "position"} | mcq_kinds

    for item in json.loads((shapes / "test.json").read_text()):
        assert (item["kind"], item["answer"]) == expected_answer(item["question"], truth[item["image"]]), item


def test_files_have_the_training_and_eval_layouts(shapes):
    pretrain = json.loads((shapes / "pretrain.json").read_text())
    finetune = json.loads((shapes / "finetune.json").read_text())
    test = json.loads((shapes / "test.json").read_text())
    assert len(pretrain) == 150 and len(test) == 40
    for sample in pretrain + finetune + test:
        if "image" in sample:
            assert (shapes / sample["image"]).is_file(), sample["id"]
    ids = [s["id"] for s in pretrain + finetune + test]
    assert len(ids) == len(set(ids)), "ids must be unique across the files"

    text_only = [s for s in finetune if "image" not in s]
    assert len(text_only) == 3 and all("<image>" not in m["value"] for s in text_only for m in s["conversations"])
    with_image = [s for s in finetune if "image" in s]
    assert len(with_image) == 150 + 50     # one per image, and a multiple choice for every third
    assert any(len(s["conversations"]) > 2 for s in with_image), "some samples must be multi-turn"
    for s in with_image:  # exactly one <image>, in the first human turn
        assert sum(m["value"].count("<image>") for m in s["conversations"]) == 1
        assert "<image>" in s["conversations"][0]["value"]

    for item in test:  # the eval format; the question carries no <image> (the evaluator adds it)
        assert {"id", "image", "question", "answer"} <= item.keys()
        assert "<image>" not in item["question"] and item["answer"].isascii() and " " not in item["answer"]
    assert {item["kind"] for item in test} == {"colour", "shape", "count", "position"}


def read_mcq(text: str) -> tuple[str, list[str]]:
    """'<image>\nQ\nA. x\nB. y\n<instruction>' -> (Q, [x, y])."""
    lines = text.split("\n")
    assert lines[0] == "<image>" and lines[-1] == make_shapes.MCQ_INSTRUCTION, text
    options = lines[2:-1]
    assert [o[:3] for o in options] == [f"{c}. " for c in "ABCD"[:len(options)]], text
    return lines[1], [o[3:] for o in options]


def test_mmbench_tsv_is_circular_vlmevalkit_layout(shapes):
    from llava_min import vlmeval
    bench = vlmeval.read_tsv(shapes / "MMBench_shapes.tsv")
    assert bench.kind == "mcq" and bench.circular
    items = json.loads((shapes / "test.json").read_text())
    test = {int(item["id"].split("-")[1]): item for item in items}
    groups = {}
    for i, row in enumerate(bench.rows):
        groups.setdefault(int(row["index"]) % 1_000_000, []).append((int(row["index"]), i))
    assert sorted(groups) == sorted(test)
    for g, members in groups.items():
        item = test[g]
        first = vlmeval.options(bench.rows[members[0][1]])
        assert [m[0] for m in members] == [g + k * 1_000_000 for k in range(len(first))]
        assert sorted(first.values()) == sorted(make_shapes.CHOICES[item["kind"]])
        for k, (_, i) in enumerate(members):
            row = bench.rows[i]
            texts = list(vlmeval.options(row).values())
            assert texts == list(first.values())[k:] + list(first.values())[:k]
            assert row["question"] == item["question"] and row[row["answer"]] == item["answer"]
            assert row["category"] == item["kind"] and row["split"] == "dev"
            (image,) = vlmeval.load_images(bench, i)
            with Image.open(shapes / item["image"]) as png:
                assert image.tobytes() == png.convert("RGB").tobytes()


def pixel_digests(folder: Path, prefix: str) -> set[bytes]:
    digests = set()
    for path in sorted((folder / "images").glob(f"{prefix}-*.png")):
        with Image.open(path) as image:
            digests.add(hashlib.sha256(image.convert("RGB").tobytes()).digest())
    return digests


def test_test_images_disjoint_from_train_even_when_repeats_are_likely(tmp_path):
    # 28 px leaves few distinct one-shape pictures, so held-out draws do hit training images
    out = tmp_path / "small"
    summary = make_shapes.make_shapes(out, n_train=400, n_test=100, seed=0, image_size=28)
    assert summary["test_images"] == 100
    train = pixel_digests(out, "train")
    test = pixel_digests(out, "test")
    assert not train & test, f"{len(train & test)} test images repeat a training image"

    # ...and that check has teeth: the same held-out draws without the exclusion do collide
    unguarded = tmp_path / "unguarded"
    (unguarded / "images").mkdir(parents=True)
    make_shapes.render_split(unguarded, "test", 100, 0, 28, exclude=set())
    assert train & pixel_digests(unguarded, "test"), "expected repeats at 28 px; the test above proves nothing"


def test_bad_arguments_are_reported(tmp_path):
    result = run_cli(tmp_path / "x", "--image-size", "20")
    assert result.returncode == 2 and "--image-size 20" in result.stderr and "at least 28" in result.stderr
    result = run_cli(tmp_path / "x", "--n-train", "-1")
    assert result.returncode == 2 and "--n-train" in result.stderr
