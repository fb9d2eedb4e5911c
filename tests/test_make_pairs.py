"""The two-image data set (data/make_pairs.py) and its evaluation (data/eval_pairs.py).

Proves that the same arguments give byte-identical files; that every pair's answer agrees with
the pixels of its two images (shape counts and colours re-derived from the PNGs, not taken from
the generator); that both answers of each kind are about equally likely (the 50% chance level the
README states); that held-out pairs use held-out images only; that the files pass LLaVADataset's
checks with two images a sample; and that eval_pairs.py answers each pair with its own two images
and scores per kind.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "data" / "make_pairs.py"
sys.path.insert(0, str(ROOT / "data"))
_spec = importlib.util.spec_from_file_location("make_pairs", SCRIPT)
make_pairs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_pairs)
from make_shapes import COLOURS  # noqa: E402  (data/ is on the path)


SIZES = dict(n_images=60, n_train=200, n_test=40, n_test_images=30, seed=1, image_size=28)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    make_pairs.make_pairs(out, **SIZES)
    return out


def seen(path: Path) -> tuple[int, str]:
    """(number of shapes, colour name) read from the pixels: shapes sit one per 2x2 grid cell."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    half = pixels.shape[0] // 2
    cells = [pixels[r:r + half, c:c + half] for r in (0, half) for c in (0, half)]
    count = sum(bool((cell != 255).any()) for cell in cells)
    coloured = pixels[(pixels != 255).any(axis=2)]
    colour = min(COLOURS, key=lambda name: np.abs(coloured - np.array(COLOURS[name])).sum())
    return count, colour


def truth(folder: Path, question: str, images: list[str]) -> str:
    n1, c1 = seen(folder / images[0])
    n2, c2 = seen(folder / images[1])
    if "more shapes" in question:
        assert n1 != n2
        return {True: "first", False: "second"}[n1 > n2]
    assert n1 == n2 == 1
    return {True: "yes", False: "no"}[c1 == c2]


def test_same_arguments_same_bytes(pairs, tmp_path):
    make_pairs.make_pairs(tmp_path, **SIZES)
    assert tree_bytes(tmp_path) == tree_bytes(pairs)


def test_answers_agree_with_the_pixels_and_are_balanced(pairs):
    finetune = json.loads((pairs / "finetune.json").read_text())
    test = json.loads((pairs / "test.json").read_text())
    two = [s for s in finetune if isinstance(s.get("image"), list)]
    assert len(two) == 200 and len(finetune) == 400
    for s in two:
        human, gpt = s["conversations"]
        assert human["value"].count("<image>") == 2
        assert gpt["value"] == truth(pairs, human["value"], s["image"]), s["id"]
    for item in test:
        assert item["answer"] == truth(pairs, item["question"], item["image"]), item["id"]
        assert all(name.startswith("images/test-") for name in item["image"])
    for kind, answers in (("more", ("first", "second")), ("colour", ("yes", "no"))):
        given = [s["conversations"][1]["value"] for s in two]
        given = [answer for answer in given if answer in answers]
        first = given.count(answers[0])
        assert len(given) == 100 and 35 <= first <= 65, (kind, first)


def test_the_files_pass_the_data_checks_with_two_images_a_sample(pairs, real_tokenizer_path):
    from llava_min.data import LLaVADataset
    ds = LLaVADataset(pairs / "finetune.json", real_tokenizer_path, pairs, image_size=28,
                      image_tokens=4, max_length=96)
    assert ds.stats["used"] == 400 and ds.stats["several_images"] == 200
    assert ds.stats["truncated"] == 0
    item = next(ds[i] for i in range(len(ds)) if len(ds[i]["images"]) == 2)
    assert item["pixel_values"].shape == (2, 3, 28, 28)


def test_eval_pairs_answers_each_pair_and_scores_per_kind(pairs, tmp_path):
    """A tiny random model answers every held-out pair (its two images given in order); scoring is
    per kind."""
    import torch
    from llava_min.dinov2 import DINOv2, DINOv2Config
    from llava_min.internlm2 import InternLM2, InternLM2Config
    from llava_min.llava import LLaVA, LLaVAConfig
    from llava_min.projector import Projector
    from llava_min.tokenizer import Tokenizer
    from llava_min.tools.tokenizer_train import train
    spec = importlib.util.spec_from_file_location("eval_pairs", ROOT / "data" / "eval_pairs.py")
    eval_pairs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_pairs)
    train([pairs / "finetune.json"], vocab_size=400, out=tmp_path / "tok.model", threads=1)
    torch.manual_seed(0)
    llm = InternLM2(InternLM2Config(vocab_size=400, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=128))
    vit = DINOv2(DINOv2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28))
    model = LLaVA(llm, vit, Projector(32, 32), LLaVAConfig(image_size=28)).eval()
    items = json.loads((pairs / "test.json").read_text())
    tok = Tokenizer(tmp_path / "tok.model")
    predictions = eval_pairs.answers(model, tok, items, pairs, batch_size=16)
    assert len(predictions) == len(items) == 40 and all(isinstance(p, str) for p in predictions)
    # Each row really saw its own two images: answering one pair alone gives that row's answer.
    alone = eval_pairs.answers(model, tok, items[17:18], pairs)
    assert alone == predictions[17:18]
    perfect = eval_pairs.score(items, [item["answer"] for item in items])
    assert perfect["accuracy"] == 1.0 and perfect["by_kind"] == {"colour": 1.0, "more": 1.0}
    flipped = {"first": "second", "second": "first", "yes": "no", "no": "yes"}
    # Right on every "more" pair, wrong on every "colour" one (punctuation is ignored).
    half = []
    for item in items:
        answer = item["answer"]
        if item["kind"] == "colour":
            answer = flipped[answer] + "."
        half.append(answer)
    assert eval_pairs.score(items, half)["by_kind"] == {"colour": 0.0, "more": 1.0}
    assert eval_pairs.score(items, half)["chance"] == 0.5


def test_too_few_images_for_a_pair_is_named(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--n-images", "24",
                          "--n-test-images", "8", "--n-train", "12", "--n-test", "4", "--image-size", "28"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "error: too few one-shape images (2) to draw a colour pair from" in run.stderr
