"""Synthetic shapes: a small, deterministic LLaVA-format data set that a tiny model can learn on a
CPU.

Each image shows one to three identical shapes (one colour, one kind) on a white background, each
in its own cell of a 2x2 grid. The task is small on purpose, so that a from-scratch LLaVA learns it
in minutes: 4 colours, 3 shapes, counts 1-3, 4 positions, one-word answers.

    python data/make_shapes.py --out data/shapes --n-train 3000 --n-test 200 --seed 0 \
        --image-size 56

writes (image paths in the JSON files are relative to --out, so train with --image-folder
data/shapes):

    images/train-000001.png ...   training images (stage 1 and stage 2 share them)
    images/test-000001.png ...    held-out images, none pixel-identical to a training image
    pretrain.json   stage 1, one caption per training image, as in LLaVA-Pretrain:
                    human "<image>\\n<caption prompt>", gpt "two red circles at the top-left and the top-right."
    finetune.json   stage 2, question/answer conversations, one per training image (some
                    multi-turn, a few with <image> after the question), a multiple-choice question
                    about every third training image in LLaVA-1.5's prompt (as its A-OKVQA samples:
                    options "A. ...", then "Answer with the option's letter from the given choices
                    directly."), and a few text-only samples
    test.json       [{"id", "image", "question", "answer"}], one question per held-out image
                    (eval's format)
    MMBench_shapes.tsv   the held-out questions as multiple choice in VLMEvalKit's MMBench layout
                    (index, question, hint, A-D, answer, category, l2-category, split, base64
                    image), with MMBench's circular copies (options rotated, index + k * 1000000,
                    image by reference)
    scenes.json     what was drawn: per image the colour, shape, count and each shape's cell and box

Questions (same kinds in training and test), answers one word:
    What colour is the shape? / What colour are the shapes?    red | green | blue | yellow
    What shape is this? / What shape are these?                circle | square | triangle
    How many shapes are there?                                 one | two | three
    Where is the <colour> <shape>?  (one-shape images only)     top-left | top-right | bottom-left | bottom-right

The same arguments give byte-identical files (every image draws from its own seeded generator). A
few thousand images take about a second.
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import json
import random
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
REGIONS = ("top-left", "top-right", "bottom-left", "bottom-right")  # the cells of a 2x2 grid, row-major
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
BACKGROUND = (255, 255, 255)
MIN_IMAGE_SIZE = 28

# The short-caption prompts of LLaVA-Pretrain (blip_laion_cc_sbu_558k), a first human turn
# "<image>\n" + one.
CAPTION_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)

# Text-only samples (about 2% of stage 2, as LLaVA-1.5's mix has ShareGPT text): the model must
# still answer without an image.
TEXT_ONLY = (
    ("How many sides does a triangle have?", "three"),
    ("How many sides does a square have?", "four"),
    ("How many corners does a circle have?", "zero"),
    ("Which shape has three sides?", "triangle"),
    ("Which shape has four equal sides?", "square"),
    ("Which shape is perfectly round?", "circle"),
    ("What colour do you get by mixing blue and yellow?", "green"),
    ("What colour is a ripe banana?", "yellow"),
)

QUESTION_KINDS = ("colour", "shape", "count", "position")
# Every answer a question kind has: the options of its multiple-choice form.
CHOICES = {"colour": sorted(COLOURS), "shape": list(SHAPES), "count": list(COUNT_WORDS.values()),
           "position": list(REGIONS)}
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# MMBench's l2-categories (VLMEvalKit prints them as CP, FP-S) for the kinds of question.
L2_CATEGORY = {"colour": "coarse_perception", "shape": "coarse_perception",
               "count": "finegrained_perception (instance-level)",
               "position": "finegrained_perception (instance-level)"}
MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                   "l2-category", "split", "image")
CIRCULAR_OFFSET = 1_000_000


# --------------------------------------------------------------------------------------------------
# One scene

def draw_scene(rng: random.Random, image_size: int) -> dict:
    """Choose what to draw: colour, shape, count, and for each shape its grid cell and pixel
    box."""
    colour = rng.choice(sorted(COLOURS))
    shape = rng.choice(SHAPES)
    count = rng.randint(1, 3)
    cell = image_size // 2
    # Keep clear of the image border (DINOv2's "crop" preprocessing cuts 1/16 of each edge) and a
    # pixel clear of the cell border, so every shape survives cropping and sits in exactly one
    # cell.
    outer = image_size // 16 + 1
    inner = 1
    room = cell - outer - inner
    objects = []
    for region in sorted(rng.sample(REGIONS, count), key=REGIONS.index):
        row, col = divmod(REGIONS.index(region), 2)
        side = rng.randint(round(0.7 * room), room)  # large enough that a 14-px patch sees the outline
        # the cell's free span starts `outer` from the image border on the outside, `inner` on the
        # inside
        x0 = col * cell + (outer if col == 0 else inner) + rng.randint(0, room - side)
        y0 = row * cell + (outer if row == 0 else inner) + rng.randint(0, room - side)
        objects.append({"region": region, "box": [x0, y0, x0 + side, y0 + side]})  # [x0, y0, x1, y1), exclusive
    return {"colour": colour, "shape": shape, "count": count, "objects": objects}


def render(scene: dict, image_size: int) -> Image.Image:
    """Draw the scene without anti-aliasing, so every pixel is either background or the shape
    colour."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene["colour"]]
    for obj in scene["objects"]:
        x0, y0, x1, y1 = obj["box"]
        if scene["shape"] == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif scene["shape"] == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:  # an upright isosceles triangle filling the box
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    return image


def questions(scene: dict) -> dict[str, tuple[str, str]]:
    """Every question this scene can answer unambiguously: kind -> (question, one-word answer)."""
    many = scene["count"] > 1
    result = {
        "colour": ("What colour are the shapes?" if many else "What colour is the shape?", scene["colour"]),
        "shape": ("What shape are these?" if many else "What shape is this?", scene["shape"]),
        "count": ("How many shapes are there?", COUNT_WORDS[scene["count"]]),
    }
    if not many:  # with several identical shapes "where is the red circle?" has no single answer
        result["position"] = (f"Where is the {scene['colour']} {scene['shape']}?", scene["objects"][0]["region"])
    return result


def caption(scene: dict) -> str:
    """'two red circles at the top-left and the bottom-right.'"""
    noun = scene["shape"]
    if scene["count"] > 1:
        noun += "s"
    places = [f"the {obj['region']}" for obj in scene["objects"]]
    where = places[0]
    if len(places) > 1:
        where = ", ".join(places[:-1]) + " and " + places[-1]
    return f"{COUNT_WORDS[scene['count']]} {scene['colour']} {noun} at {where}."


# --------------------------------------------------------------------------------------------------
# The data set

def sample_rng(seed: int, split: str, index: int, attempt: int = 0) -> random.Random:
    # One generator per image (string seeds hash with SHA-512: the same in every process and Python
    # run), so any image can be regenerated alone and the output does not depend on generation
    # order.
    return random.Random(f"shapes/{seed}/{split}/{index}/{attempt}")


def render_split(out: Path, split: str, n: int, seed: int, image_size: int, exclude: set[bytes]):
    """Render n images to out/images/<split>-NNNNNN.png; redraw any whose pixels are in `exclude`.

    Returns [(relative image path, scene, rng)] and the set of pixel digests of the written images.
    """
    rendered = []
    digests = set()
    for i in range(1, n + 1):
        for attempt in range(1000):
            rng = sample_rng(seed, split, i, attempt)
            scene = draw_scene(rng, image_size)
            image = render(scene, image_size)
            digest = hashlib.sha256(image.tobytes()).digest()
            if digest not in exclude:
                break
        else:
            raise RuntimeError(f"{split} image {i}: 1000 draws all repeat a training image; use a larger "
                               f"--image-size or fewer images")
        relative = f"images/{split}-{i:06d}.png"
        image.save(out / relative, format="PNG", compress_level=6)
        rendered.append((relative, scene, rng))
        digests.add(digest)
    return rendered, digests


def conversation(rng: random.Random, scene: dict) -> list[dict]:
    """1-3 question/answer turns about one image; <image> goes with the first question."""
    available = questions(scene)
    turns = min(len(available), rng.choices((1, 2, 3), weights=(6, 3, 1))[0])
    messages = []
    for k, kind in enumerate(rng.sample(sorted(available), turns)):
        question, answer = available[kind]
        if k == 0:  # LLaVA data has <image> before or after the first question; most put it first
            question = f"{question}\n<image>" if rng.random() < 0.05 else f"<image>\n{question}"
        messages += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return messages


def multiple_choice(question: str, kind: str, answer: str,
                    rng: random.Random) -> tuple[list[str], str]:
    """The kind's answers in a random order as options, and the letter of the right one."""
    options = list(CHOICES[kind])
    rng.shuffle(options)
    return options, "ABCD"[options.index(answer)]


def mcq_text(question: str, options: list[str]) -> str:
    """LLaVA-1.5's multiple-choice prompt, as VLMEvalKit's LLaVA_XTuner.build_prompt asks it."""
    lines = [question] + [f"{letter}. {text}" for letter, text in zip("ABCD", options)]
    return "\n".join(lines) + "\n" + MCQ_INSTRUCTION


def mmbench_rows(out: Path, test_items: list[dict], seed: int) -> list[list[str]]:
    """VLMEvalKit MMBench rows for the held-out questions: each question with its options in a
    random order, then its circular copies (options rotated by one per copy, the answer following
    its text, the image a reference to the first row's index)."""
    rows = []
    for i, item in enumerate(test_items, start=1):
        rng = sample_rng(seed, "mmbench", i)
        options, letter = multiple_choice(item["question"], item["kind"], item["answer"], rng)
        image = base64.b64encode((out / item["image"]).read_bytes()).decode()
        for k in range(len(options)):
            shifted = options[k:] + options[:k]
            cells = shifted + [""] * (4 - len(shifted))
            answer = "ABCD"[shifted.index(item["answer"])]
            if k == 0:
                assert answer == letter
            # the copies' image: a reference to the first row's index
            if k > 0:
                image = str(i)
            rows.append([str(i + k * CIRCULAR_OFFSET), item["question"], "", *cells, answer,
                         item["kind"], L2_CATEGORY[item["kind"]], "dev", image])
    return rows


def write_tsv(path: Path, columns, rows) -> None:
    """A TSV as pandas' to_csv(sep="\t") writes VLMEvalKit's files; atomic."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
    tmp.replace(path)


def make_shapes(out: str | Path, n_train: int = 3000, n_test: int = 200, seed: int = 0,
                image_size: int = 56) -> dict:
    """Write the data set to `out` (see the module docstring); returns a summary dict."""
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"--image-size {image_size} is too small to draw recognisable shapes; "
                         f"use at least {MIN_IMAGE_SIZE}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"--n-train ({n_train}) and --n-test ({n_test}) must be >= 0")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):  # a previous, larger run must not leave extra images behind
        for stale in (out / "images").glob(f"{split}-*.png"):
            stale.unlink()

    train, train_digests = render_split(out, "train", n_train, seed, image_size, exclude=set())
    test, _ = render_split(out, "test", n_test, seed, image_size, exclude=train_digests)

    pretrain = []
    finetune = []
    for i, (image, scene, rng) in enumerate(train, start=1):
        prompt = rng.choice(CAPTION_PROMPTS)
        pretrain.append({"id": f"caption-{i:06d}", "image": image, "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": caption(scene)}]})
        finetune.append({"id": f"qa-{i:06d}", "image": image, "conversations": conversation(rng, scene)})
    # A multiple-choice question about every third image, from generators of their own: the other
    # samples stay as they were.
    for i, (image, scene, _) in enumerate(train, start=1):
        if i % 3:
            continue
        rng = sample_rng(seed, "mcq", i)
        kind = rng.choice(sorted(questions(scene)))
        question, answer = questions(scene)[kind]
        options, letter = multiple_choice(question, kind, answer, rng)
        finetune.append({"id": f"mcq-{i:06d}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\n" + mcq_text(question, options)},
            {"from": "gpt", "value": letter}]})
    text_rng = sample_rng(seed, "text", 0)
    for i in range(1, (n_train // 50 if n_train >= 50 else min(n_train, 1)) + 1):
        question, answer = text_rng.choice(TEXT_ONLY)
        finetune.append({"id": f"text-{i:06d}", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": answer}]})

    test_items = []
    for i, (image, scene, rng) in enumerate(test, start=1):
        kind = rng.choice(sorted(questions(scene)))
        question, answer = questions(scene)[kind]
        test_items.append({"id": f"test-{i:06d}", "image": image, "question": question, "answer": answer,
                           "kind": kind})

    scenes = {"image_size": image_size, "seed": seed, "background": list(BACKGROUND),
              "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
              "images": {image: scene for image, scene, _ in train + test}}
    for name, obj in (("pretrain.json", pretrain), ("finetune.json", finetune), ("test.json", test_items),
                      ("scenes.json", scenes)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        tmp.replace(out / name)  # atomic: a reader never sees half a file
    mmbench = mmbench_rows(out, test_items, seed)
    write_tsv(out / "MMBench_shapes.tsv", MMBENCH_COLUMNS, mmbench)
    mcq = sum(1 for s in finetune if s["id"].startswith("mcq-"))
    return {"train_images": len(train), "test_images": len(test), "pretrain": len(pretrain),
            "finetune": len(finetune), "multiple_choice": mcq,
            "text_only": len(finetune) - len(train) - mcq, "test": len(test_items),
            "mmbench_rows": len(mmbench)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/shapes", help="output folder (default: data/shapes)")
    parser.add_argument("--n-train", type=int, default=3000, help="training images (default: 3000)")
    parser.add_argument("--n-test", type=int, default=200, help="held-out images, one question each (default: 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=56,
                        help="side in pixels (default: 56 = 4 x 4 patches of 14 for the tiny ViT)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = make_shapes(args.out, args.n_train, args.n_test, args.seed, args.image_size)
    except ValueError as e:
        parser.error(str(e))
    print(f"{args.out}: {summary['train_images']} train + {summary['test_images']} test images "
          f"({args.image_size}px), pretrain.json {summary['pretrain']}, finetune.json {summary['finetune']} "
          f"({summary['multiple_choice']} multiple choice, {summary['text_only']} text-only), "
          f"test.json {summary['test']}, MMBench_shapes.tsv {summary['mmbench_rows']} rows, "
          f"in {time.perf_counter() - start:.1f} s; train with --image-folder {args.out}")


if __name__ == "__main__":
    sys.exit(main())
