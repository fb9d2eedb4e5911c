"""VLMEvalKit-layout TSVs and a tiny model folder, for the eval tests and bench/eval.py.

    write_tsv(path, columns, rows)     # `image` cells: base64 PNG, an index (a reference) or a list
    png_b64(colour, size=28)           # one flat-coloured PNG as VLMEvalKit stores images
    tok, folder = tiny_model(folder)   # random tiny LLaVA + a small tokenizer, as train.py writes

The TSV is written as pandas' to_csv(sep="\\t") writes VLMEvalKit's files: a header line, minimal
quoting.
"""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import torch
from PIL import Image

from llava_min.dinov2 import DINOv2, DINOv2Config
from llava_min.internlm2 import InternLM2, InternLM2Config
from llava_min.llava import LLaVA, LLaVAConfig
from llava_min.projector import Projector
from llava_min.tools.tokenizer_train import train as train_tokenizer

WORDS = ("What colour is the shape? Which shape is shown? Is there a red circle? A. red B. blue "
         "C. green D. yellow Answer with the option's letter from the given choices directly. "
         "Answer the question using a single word or phrase. Hint: look closely. yes no circle "
         "square triangle 图中是什么 请直接回答选项字母。")


def png_b64(colour=(200, 30, 30), size: int = 28) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path: Path, columns: list[str], rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
    return path


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return repr(value)
    return str(value)


def tiny_model(folder: Path, llm: InternLM2Config | None = None, vit: DINOv2Config | None = None,
               image_size: int = 28, seed: int = 0):
    """A random LLaVA and a small tokenizer in `folder`, loadable as `--model folder`. Returns
    (tok, folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.json"
    corpus.write_text(json.dumps([{"conversations": [{"from": "human", "value": WORDS},
                                                     {"from": "gpt", "value": WORDS}]}]))
    tok = train_tokenizer([corpus], 360, folder / "tokenizer.model", threads=1)
    llm = llm or InternLM2Config(vocab_size=384, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    vit = vit or DINOv2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size)
    torch.manual_seed(seed)
    config = LLaVAConfig(image_size=image_size, stop_ids=[tok.im_end_id, tok.eos_id],
                         text_vocab_size=tok.vocab_size)
    model = LLaVA(InternLM2(llm), DINOv2(vit), Projector(vit.hidden_size, llm.hidden_size), config)
    model.save_pretrained(folder)
    return tok, folder


# The benchmark files of the tests, each with fixed predictions whose scores are derived by hand in
# tests/test_vlmeval.py from VLMEvalKit's rules.

MCQ_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category",
               "split", "image"]


def _rotations(index: int, question: str, texts: list[str], answer: int,
               extra: dict) -> list[dict]:
    """MMBench's circular copies: the options shifted by one per copy (index + k * 1e6), the answer
    following its text; the copies' image a reference to the first row's."""
    rows = []
    for k in range(len(texts)):
        shifted = texts[k:] + texts[:k]
        row = {"index": index + k * 1_000_000, "question": question, **extra,
               "answer": "ABCD"[shifted.index(texts[answer])], "image": str(index)}
        row.update({letter: text for letter, text in zip("ABCD", shifted)})
        rows.append(row)
    rows[0]["image"] = png_b64((40 * index % 255, 80, 160))
    return rows


def mcq_rows() -> tuple[list[dict], dict[int, str]]:
    """Four circular groups (4, 2, 3 and 4 options; a hint; a Chinese question) and one prediction
    per row."""
    cp = {"category": "image_emotion", "l2-category": "coarse_perception", "split": "dev"}
    lr = {"category": "future_prediction", "l2-category": "logic_reasoning", "split": "dev"}
    hint = {**cp, "hint": "Look at the top."}
    rows = (_rotations(1, "Which animal is shown?", ["cat", "dog", "bird", "fish"], 0, cp)
            + _rotations(2, "Is the sky visible?", ["yes it is", "no"], 1, hint)
            + _rotations(3, "图中是什么动物？", ["猫", "狗", "鸟"], 2, lr)
            + _rotations(4, "What colour is the shape?", ["red", "blue", "green", "yellow"], 1, lr))
    predictions = {
        # group 1: all four right
        1: "A", 1000001: "(D) cat", 2000001: "The answer is C.", 3000001: "cat",
        # group 2: two letters are no answer
        2: "A B", 1000002: "A",
        # group 3: an empty answer
        3: "C", 1000003: "", 2000003: "A",
        # group 4: the last copy's C stands too early to count
        4: "B", 1000004: "A", 2000004: "D",
        3000004: "I think the answer is option C because it is right",
    }
    return rows, predictions


YORN_COLUMNS = ["index", "question", "answer", "category", "l2-category", "image"]


def pope_rows() -> tuple[list[dict], dict[int, str]]:
    cases = [("adversarial", "Yes", "Yes"), ("adversarial", "No", "No, there is not."),
             ("adversarial", "No", "yes"),
             ("popular", "Yes", "Yes and no"), ("popular", "Yes", ""), ("random", "No", "no."),
             ("random", "Yes", "There is a dog. Yes."), ("popular,random", "No", "Yes")]
    rows = []
    predictions = {}
    for k, (category, answer, prediction) in enumerate(cases, start=1):
        rows.append({"index": k, "question": "Is there a dog in the image?", "answer": answer,
                     "category": category, "image": png_b64((20 * k, 100, 100))})
        predictions[k] = prediction
    return rows, predictions


def yorn_rows() -> tuple[list[dict], dict[int, str]]:
    cases = [("c1", "l2a", "Yes", "Yes"), ("c1", "l2a", "No", "yes"), ("c2", "l2b", "No", "NO"),
             ("c2", "l2a", "Yes", "I don't know")]
    rows = []
    for k, (c, l2, a, _) in enumerate(cases, start=1):
        rows.append({"index": k, "question": "Is it red?", "answer": a, "category": c,
                     "l2-category": l2, "image": png_b64((200, 10 * k, 10))})
    return rows, {k: p for k, (*_, p) in enumerate(cases, start=1)}


VQA_COLUMNS = ["index", "question", "answer", "category", "image"]


def vqa_rows() -> tuple[list[dict], dict[int, str]]:
    cases = [("brand", ["Coca Cola"] * 2 + ["coca-cola"] + ["pepsi"] * 7, "Coca Cola."),
             ("brand", ["2", "two"] + ["3"] * 8, "Two"),
             ("brand", ["a dog", "dog", "the dog", "dog"] + ["cat"] * 6, "the dog"),
             ("misc", ["yes"] * 10, ""),
             ("misc", "Paris", "paris."),
             ("misc", ["1,000", "1000"] + ["one thousand"] * 8, "1000")]
    rows = [{"index": k, "question": "What is written?", "answer": a, "category": c,
             "image": png_b64((10, 10 * k, 200))} for k, (c, a, _) in enumerate(cases, start=1)]
    return rows, {k: p for k, (*_, p) in enumerate(cases, start=1)}
