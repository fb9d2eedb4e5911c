"""Synthetic image pairs: LLaVA-format samples with two images whose answer needs both of them.

The images are make_shapes.py's (one to three identical shapes of one colour on white, drawn by its
draw_scene and render); a sample shows two of them, interleaved with the text, and asks:
    Which image has more shapes, the first or the second?   first | second   (the counts differ)
    Are the two shapes the same colour?                     yes | no         (one shape each)
Each answer is equally likely by construction, so the chance level is 50% for both kinds.

    python data/make_pairs.py --out data/pairs --n-images 1500 --n-train 3000 --n-test 200 --seed 0

writes (image paths relative to --out: train with --image-folder data/pairs):
    images/train-000001.png ...  the training images; images/test-*.png the held-out ones
                                 (no pair of test.json uses a training image)
    pretrain.json   stage 1: one caption per training image, one image per sample
    finetune.json   stage 2: the pair questions ("image": [first, second]) and, as many again,
                    one-image questions (make_shapes.py's conversations)
    test.json       [{"id", "image": [first, second], "question", "answer", "kind"}], held-out
                    pairs; the question holds the two <image> tags where the images go
The same arguments give byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_shapes import CAPTION_PROMPTS, caption, conversation, draw_scene, render  # noqa: E402

PAIR_KINDS = ("more", "colour")
PREFIX = "The first image: <image>\nThe second image: <image>\n"
QUESTIONS = {"more": "Which image has more shapes, the first or the second?",
             "colour": "Are the two shapes the same colour?"}


Image = tuple[str, dict]   # (path relative to --out, scene)


def render_images(out: Path, split: str, n: int, seed: int, image_size: int) -> list[Image]:
    """n images of `split` (relative path, scene), each drawn from its own seeded generator."""
    images = []
    for i in range(1, n + 1):
        rng = random.Random(f"pairs/{seed}/{split}/{i}")
        scene = draw_scene(rng, image_size)
        relative = f"images/{split}-{i:06d}.png"
        render(scene, image_size).save(out / relative, format="PNG", compress_level=6)
        images.append((relative, scene))
    return images


def pair_question(rng: random.Random, kind: str, images: list[Image]) -> tuple[list[str], str]:
    """([first, second] image paths, answer) of one question of `kind`, both answers equally
    likely."""
    if kind == "more":
        # Any two images whose counts differ: first and second are symmetric.
        for _ in range(1000):
            first, second = rng.sample(images, 2)
            if first[1]["count"] != second[1]["count"]:
                return [first[0], second[0]], _answer(kind, first[1], second[1])
        raise ValueError("no two images with different shape counts; use more --n-images")
    # One shape in each image; "same colour" decided first, with probability one half.
    singles = [image for image in images if image[1]["count"] == 1]
    same = rng.random() < 0.5
    first = rng.choice(singles)
    candidates = [image for image in singles
                  if image is not first and (image[1]["colour"] == first[1]["colour"]) == same]
    if not candidates:
        raise ValueError(f"too few one-shape images ({len(singles)}) to draw a colour pair from; use more "
                         f"--n-images or --n-test-images")
    second = rng.choice(candidates)
    return [first[0], second[0]], _answer(kind, first[1], second[1])


def _answer(kind: str, first: dict, second: dict) -> str:
    if kind == "more":
        if first["count"] > second["count"]:
            return "first"
        return "second"
    if first["colour"] == second["colour"]:
        return "yes"
    return "no"


def pairs(rng: random.Random, n: int, images: list[Image], split: str) -> list[dict]:
    """n pair questions, the kinds alternating."""
    out = []
    for i in range(n):
        kind = PAIR_KINDS[i % len(PAIR_KINDS)]
        paths, answer = pair_question(rng, kind, images)
        out.append({"id": f"{split}-pair-{i + 1:06d}", "image": paths,
                    "question": PREFIX + QUESTIONS[kind], "answer": answer, "kind": kind})
    return out


def make_pairs(out: str | Path, n_images: int = 1500, n_train: int = 3000, n_test: int = 200,
               n_test_images: int = 200, seed: int = 0, image_size: int = 56) -> dict:
    """Write the data set to `out` (see the module docstring); returns a summary dict."""
    if n_images < 4 or n_test_images < 4:
        raise ValueError(f"--n-images ({n_images}) and --n-test-images ({n_test_images}) must be "
                         f"at least 4")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for stale in (out / "images").glob("*.png"):
        stale.unlink()
    train_images = render_images(out, "train", n_images, seed, image_size)
    test_images = render_images(out, "test", n_test_images, seed, image_size)

    rng = random.Random(f"pairs/{seed}/samples")
    pretrain = []
    finetune = []
    for i, (image, scene) in enumerate(train_images, start=1):
        prompt = rng.choice(CAPTION_PROMPTS)
        turns = [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": caption(scene)}]
        pretrain.append({"id": f"caption-{i:06d}", "image": image, "conversations": turns})
    for item in pairs(rng, n_train, train_images, "train"):
        turns = [{"from": "human", "value": item["question"]}, {"from": "gpt", "value": item["answer"]}]
        finetune.append({"id": item["id"], "image": item["image"], "conversations": turns})
    # One-image questions, as many as the pairs: what each image shows, learnt alone.
    for i in range(n_train):
        image, scene = rng.choice(train_images)
        turns = conversation(rng, scene)
        finetune.append({"id": f"single-{i + 1:06d}", "image": image, "conversations": turns})
    rng.shuffle(finetune)
    test = pairs(rng, n_test, test_images, "test")

    files = {"pretrain.json": pretrain, "finetune.json": finetune, "test.json": test}
    for name, obj in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        tmp.replace(out / name)  # atomic: a reader never sees half a file
    return {"train_images": n_images, "test_images": n_test_images, "pretrain": len(pretrain),
            "finetune": len(finetune), "pairs": n_train, "test": len(test)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/pairs")
    p.add_argument("--n-images", type=int, default=1500,
                   help="training images the pairs are drawn from")
    p.add_argument("--n-test-images", type=int, default=200,
                   help="held-out images the test pairs are drawn from")
    p.add_argument("--n-train", type=int, default=3000,
                   help="training pairs (and as many one-image samples)")
    p.add_argument("--n-test", type=int, default=200, help="held-out pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=56)
    args = p.parse_args(argv)
    try:
        summary = make_pairs(args.out, args.n_images, args.n_train, args.n_test, args.n_test_images,
                             args.seed, args.image_size)
    except ValueError as e:   # too few images for the pairs asked for: the message says which flag
        sys.exit(f"error: {e}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
