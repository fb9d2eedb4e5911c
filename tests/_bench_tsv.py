"""VLMEvalKit-layout TSVs and a tiny model folder, for the eval tests and bench/eval.py.

    write_tsv(path, columns, rows)        # rows: dicts; `image` cells: base64 PNG, an index (a reference) or a list
    png_b64(colour, size=28)              # one flat-coloured PNG as VLMEvalKit stores images
    tok, folder = tiny_model(folder)      # random tiny LLaVA + a small tokenizer, as train.py writes OUT

The TSV is written as pandas' to_csv(sep="\\t") writes VLMEvalKit's files: a header line, minimal quoting.
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

WORDS = ("What colour is the shape? Which shape is shown? Is there a red circle? A. red B. blue C. green D. "
         "yellow Answer with the option's letter from the given choices directly. Answer the question using a "
         "single word or phrase. Hint: look closely. yes no circle square triangle 图中是什么 请直接回答选项字母。")


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
    """A random LLaVA and a small tokenizer in `folder`, loadable as `--model folder`. Returns (tok, folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.json"
    corpus.write_text(json.dumps([{"conversations": [{"from": "human", "value": WORDS},
                                                     {"from": "gpt", "value": WORDS}]}]))
    tok = train_tokenizer([corpus], 360, folder / "tokenizer.model", threads=1)
    llm = llm or InternLM2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)
    vit = vit or DINOv2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=image_size)
    torch.manual_seed(seed)
    config = LLaVAConfig(image_size=image_size, stop_ids=[tok.im_end_id, tok.eos_id], text_vocab_size=tok.vocab_size)
    model = LLaVA(InternLM2(llm), DINOv2(vit), Projector(vit.hidden_size, llm.hidden_size), config)
    model.save_pretrained(folder)
    return tok, folder
