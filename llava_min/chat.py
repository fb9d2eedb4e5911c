"""Talk to a trained model about one or more images.

    python -m llava_min.chat --model out/stage2 --image cat.png "What is in the picture?"
    python -m llava_min.chat --model out/stage2 --image a.png --image b.png \
        "What differs between <image> and <image>?"
    python -m llava_min.chat --model out/stage2 --image cat.png   # interactive: a question a line

The prompt is the internlm2_chat template that training used (`encode_conversation`), cut where the
answer would start, so chat and training can never disagree about the format. --image may be given
several times: the images go to the model in that order, one per `<image>` tag of the question, or
one `<image>\\n` each in front of a question that has no tags.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import IGNORE_INDEX, LlavaMinError
from .data import encode_conversation
from .image import load_image, preprocess
from .llava import LLaVA
from .tokenizer import Tokenizer

IMAGE_TAG = "<image>"


def with_image_tags(question: str, images: int) -> str:
    """The question as the model sees it: its own <image> tags kept where they are (one per image),
    or, without tags, one "<image>\\n" per image in front."""
    tags = question.count(IMAGE_TAG)
    if tags == 0:
        return (IMAGE_TAG + "\n") * images + question
    if tags != images:
        raise LlavaMinError(f"the question has {tags} {IMAGE_TAG} tag(s) but {images} image(s) "
                            "were given: "
                            f"{question[:80]!r}; give one image per tag, or no tags")
    return question


def prompt_ids(tok: Tokenizer, question: str, images: int | bool = 0,
               system: str | None = None) -> list[int]:
    """Token ids of a one-turn prompt, ending with `<|im_start|>assistant\\n`, ready for
    generation. images: how many images go with it (True = one); see `with_image_tags`."""
    text = with_image_tags(question, int(images))
    conversation = [{"from": "human", "value": text}, {"from": "gpt", "value": ""}]
    ids, labels = encode_conversation(tok, conversation, max_length=1 << 30, system=system)
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[:first_answer]


def load_for_inference(model_dir: str | Path, device: str = "cpu",
                       dtype: torch.dtype | None = None):
    """The model, its tokenizer (model_dir/tokenizer.model) and its image settings, ready for
    generation."""
    model_dir = Path(model_dir)
    tok_file = model_dir / "tokenizer.model"
    if not tok_file.exists():
        raise FileNotFoundError(f"{tok_file} is missing; train.py writes the tokenizer beside the "
                                "weights")
    model = LLaVA.from_pretrained(model_dir, dtype=dtype, device=device).eval()
    return model, Tokenizer(tok_file)


def answer(model: LLaVA, tok: Tokenizer, question: str, image_paths: list[str] | str | None = None,
           max_new_tokens: int = 128, temperature: float = 0.0, system: str | None = None) -> str:
    """One answer; image_paths: none, one file, or a list of files (in the order of the question's
    tags)."""
    device = next(model.parameters()).device
    if isinstance(image_paths, (str, Path)):
        image_paths = [image_paths]
    image_paths = list(image_paths or [])
    pixels = None
    if image_paths:
        images = []
        for path in image_paths:
            images.append(preprocess(load_image(path), model.config.image_size,
                                     mode=model.config.image_mode,
                                     preprocessing=model.vit.config.preprocessing))
        pixels = torch.stack(images).to(device)                          # (n_images, 3, H, W)
    ids = torch.tensor([prompt_ids(tok, question, len(image_paths), system)], device=device)
    new = model.generate(ids, pixels, max_new_tokens=max_new_tokens, temperature=temperature)
    new = new[0].tolist()
    return tok.decode([t for t in new if t not in model.config.stop_ids])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by train.py / finetune.py")
    p.add_argument("--image", action="append", default=[],
                   help="image file; repeat for several images, in order (omit for a text-only "
                        "question)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--system", default=None, help="optional system prompt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("question", nargs="?",
                   help="one question; without it, read questions from stdin")
    args = p.parse_args(argv)
    model, tok = load_for_inference(args.model, args.device)

    def ask(question: str) -> str:
        return answer(model, tok, question, args.image, args.max_new_tokens, args.temperature,
                      args.system)

    if args.question:
        print(ask(args.question))
        return
    print("one question per line; Ctrl-D to quit", file=sys.stderr)
    for line in sys.stdin:
        if line.strip():
            print(ask(line.strip()), flush=True)


if __name__ == "__main__":
    try:
        main()
    # bad input: the message says what and where, no traceback
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
