"""Talk to a trained model about an image.

    python -m llava_min.chat --model out/stage2 --image cat.png "What is in the picture?"
    python -m llava_min.chat --model out/stage2 --image cat.png          # interactive: one question a line

The prompt is the internlm2_chat template that training used (`encode_conversation`), cut where the answer
would start, so chat and training can never disagree about the format.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import IGNORE_INDEX
from .data import encode_conversation
from .image import load_image, preprocess
from .llava import LLaVA
from .tokenizer import Tokenizer


def prompt_ids(tok: Tokenizer, question: str, with_image: bool, system: str | None = None) -> list[int]:
    """Token ids of a one-turn prompt, ending with `<|im_start|>assistant\\n`, ready for generation."""
    text = f"<image>\n{question}" if with_image else question
    conversation = [{"from": "human", "value": text}, {"from": "gpt", "value": ""}]
    ids, labels = encode_conversation(tok, conversation, max_length=1 << 30, system=system)
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[:first_answer]


def load_for_inference(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """The model, its tokenizer (model_dir/tokenizer.model) and its image settings, ready for generation."""
    model_dir = Path(model_dir)
    tok_file = model_dir / "tokenizer.model"
    if not tok_file.exists():
        raise FileNotFoundError(f"{tok_file} is missing; train.py writes the tokenizer beside the weights")
    model = LLaVA.from_pretrained(model_dir, dtype=dtype, device=device).eval()
    return model, Tokenizer(tok_file)


def answer(model: LLaVA, tok: Tokenizer, question: str, image_path: str | None, max_new_tokens: int = 128,
           temperature: float = 0.0, system: str | None = None) -> str:
    device = next(model.parameters()).device
    pixels = None
    if image_path is not None:
        image = load_image(image_path)
        pixels = preprocess(image, model.config.image_size, mode=model.config.image_mode,
                        preprocessing=model.vit.config.preprocessing)[None].to(device)
    ids = torch.tensor([prompt_ids(tok, question, image_path is not None, system)], device=device)
    new = model.generate(ids, pixels, max_new_tokens=max_new_tokens, temperature=temperature)[0].tolist()
    return tok.decode([t for t in new if t not in model.config.stop_ids])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by train.py / finetune.py")
    p.add_argument("--image", help="image file (omit for a text-only question)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--system", default=None, help="optional system prompt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("question", nargs="?", help="one question; without it, read questions from stdin")
    args = p.parse_args(argv)
    model, tok = load_for_inference(args.model, args.device)
    ask = lambda q: answer(model, tok, q, args.image, args.max_new_tokens, args.temperature, args.system)  # noqa: E731
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
    except (ValueError, FileNotFoundError) as e:   # bad input: the message says what and where, no traceback
        sys.exit(f"error: {e}")
