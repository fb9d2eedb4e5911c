"""Exact-match evaluation on a held-out question/answer set.

    python -m llava_min.eval --model out/stage2 --data data/shapes/test.json --image-folder data/shapes

test.json is a list of {"id", "image", "question", "answer"}. Answers are generated greedily in batches
(left-padded prompts, one KV cache per batch) and compared after lower-casing and stripping surrounding
punctuation and white space. Writes one JSON line per sample to --answers (default: beside --model as
eval_answers.jsonl); the last line printed is a JSON summary with "accuracy".
"""
from __future__ import annotations

import argparse
import json
import string
import sys
import time
from pathlib import Path

import torch

from . import LlavaMinError
from .chat import load_for_inference, prompt_ids
from .image import load_image, preprocess

_STRIP = string.punctuation + string.whitespace


def normalise(text: str) -> str:
    return text.strip(_STRIP).lower().strip(_STRIP)


def load_test_set(path: str | Path) -> list[dict]:
    items = json.loads(Path(path).read_text())
    if not isinstance(items, list):
        raise LlavaMinError(f"{path}: expected a JSON list of {{id, image, question, answer}} objects")
    for i, item in enumerate(items):
        missing = [k for k in ("id", "question", "answer") if k not in item]
        if missing:
            raise LlavaMinError(f"{path}: item {i} (id {item.get('id')!r}) lacks {missing}")
    return items


@torch.no_grad()
def evaluate(model, tok, items: list[dict], image_folder: str | Path | None, batch_size: int = 16,
             max_new_tokens: int = 16) -> list[dict]:
    device = next(model.parameters()).device
    folder = Path(image_folder) if image_folder else Path(".")
    results = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        prompts = [prompt_ids(tok, it["question"], bool(it.get("image"))) for it in batch]
        T = max(map(len, prompts))
        # Left padding: every prompt ends at the same column, so generation appends in step.
        ids = torch.full((len(batch), T), model.config.pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, T - len(p):] = torch.tensor(p)
            mask[r, T - len(p):] = 1
        images = [preprocess(load_image(folder / it["image"]), model.config.image_size, mode=model.config.image_mode,
                             preprocessing=model.vit.config.preprocessing)
                  for it in batch if it.get("image")]
        pixels = torch.stack(images).to(device) if images else None
        new = model.generate(ids.to(device), pixels, max_new_tokens=max_new_tokens, attention_mask=mask.to(device))
        for it, row in zip(batch, new.tolist()):
            text = tok.decode([t for t in row if t not in model.config.stop_ids])
            results.append({"id": it["id"], "question": it["question"], "answer": it["answer"], "prediction": text,
                            "correct": normalise(text) == normalise(str(it["answer"]))})
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="test.json: list of {id, image, question, answer}")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--answers", default=None, help="per-sample JSONL output (default MODEL/eval_answers.jsonl)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    model, tok = load_for_inference(args.model, args.device)
    items = load_test_set(args.data)
    t0 = time.time()
    results = evaluate(model, tok, items, args.image_folder, args.batch_size, args.max_new_tokens)
    out = Path(args.answers) if args.answers else Path(args.model) / "eval_answers.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in results))
    correct = sum(r["correct"] for r in results)
    summary = {"accuracy": correct / max(len(results), 1), "correct": correct, "total": len(results),
               "seconds": round(time.time() - t0, 2), "answers": str(out)}
    print(json.dumps(summary))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:   # bad input: the message says what and where, no traceback
        sys.exit(f"error: {e}")
