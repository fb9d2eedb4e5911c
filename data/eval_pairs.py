"""Accuracy on the held-out pairs of make_pairs.py: greedy LLaVA.generate on each two-image prompt,
exact match.

    python data/eval_pairs.py --model out/pairs/stage2 --data data/pairs/test.json --image-folder data/pairs

Prints one JSON line: the accuracy overall and per kind, beside the chance level (50%: two answers,
equally likely) and the share of the test set's most common answer per kind.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llava_min.chat import load_for_inference  # noqa: E402
from llava_min.eval import evaluate, normalise  # noqa: E402


def answers(model, tok, items: list[dict], folder: Path, batch_size: int = 32) -> list[str]:
    """The model's answer to each item, in order: llava_min.eval's batched greedy generation (the
    question's <image> tags stay where they are, the images in their order)."""
    results = evaluate(model, tok, items, folder, batch_size=batch_size, max_new_tokens=4)
    return [result["prediction"] for result in results]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="make_pairs.py's test.json")
    p.add_argument("--image-folder", required=True)
    args = p.parse_args(argv)
    model, tok = load_for_inference(args.model)
    items = json.loads(Path(args.data).read_text())
    print(json.dumps(score(items, answers(model, tok, items, Path(args.image_folder)))))


def score(items: list[dict], predictions: list[str]) -> dict:
    """Exact match overall and per kind, beside the chance level and each kind's most common answer share."""
    right = Counter()
    total = Counter()
    common = {}
    for kind in sorted({item["kind"] for item in items}):
        answers_of_kind = Counter(item["answer"] for item in items if item["kind"] == kind)
        common[kind] = round(answers_of_kind.most_common(1)[0][1] / sum(answers_of_kind.values()), 3)
    for item, prediction in zip(items, predictions, strict=True):
        total[item["kind"]] += 1
        right[item["kind"]] += normalise(prediction) == normalise(item["answer"])
    return {"accuracy": round(sum(right.values()) / len(items), 3), "total": len(items),
            "by_kind": {kind: round(right[kind] / total[kind], 3) for kind in sorted(total)},
            "chance": 0.5, "most_common_answer_share": common}


if __name__ == "__main__":
    main()
