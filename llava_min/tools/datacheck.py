"""`python -m llava_min.data check|show`: check LLaVA data before a run (data.sample_problems on
every sample, all bad ones listed; --decode decodes every image in worker processes; --tokenizer
counts the samples that max_length cuts or leaves unsupervised), and show one sample as the model
sees it.

    python -m llava_min.data check --data FILE [FILE ...] --image-folder DIR
                                   [--decode --num-workers N]
                                   [--tokenizer tok.model --max-length N --image-tokens K]
    python -m llava_min.data show --data FILE [FILE ...] --index N
                                  [--tokenizer tok.model] [--image-folder DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from itertools import groupby

from .. import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaMinError
from ..data import (FileIndex, Samples, describe, image_files, image_paths, llm_positions,
                    problem_report, sample_problems, tokenize)
from ..image import load_image
from ..tokenizer import Tokenizer


def _decode_chunk(items: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(index, error) for each image in `items` that does not decode fully (runs in a worker process).
    """
    errors = []
    for index, path in items:
        try:
            load_image(path)
        except LlavaMinError as e:
            errors.append((index, str(e)))
    return errors


def decode_images(items: list[tuple[int, str]], num_workers: int = 0,
                  chunk: int = 16) -> dict[int, str]:
    """{index: error} for the images in `items` ((index, path) pairs) that do not decode."""
    chunks = iter([items[k:k + chunk] for k in range(0, len(items), chunk)])
    if num_workers <= 0:
        return {i: e for c in chunks for i, e in _decode_chunk(c)}
    errors = {}
    # Unlike multiprocessing.Pool, the executor notices a worker that dies (the OOM killer, a crash
    # in a decoder) and fails the pending work instead of waiting for ever. Two chunks per worker
    # at most: the error names them.
    with ProcessPoolExecutor(num_workers) as pool:
        pending = {}
        try:
            while True:
                while len(pending) < 2 * num_workers and (c := next(chunks, None)) is not None:
                    pending[pool.submit(_decode_chunk, c)] = c
                if not pending:
                    return errors
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    errors.update(future.result())
                    del pending[future]
        except BrokenProcessPool as e:
            paths = [p for c in pending.values() for _, p in c]
            raise LlavaMinError(f"an image decoding worker died abruptly (killed by the OOM killer, "
                                f"or a crash in an image decoder) while decoding one of these "
                                f"{len(paths)} images: {', '.join(paths)}; rerun with --num-workers 0 "
                                f"to find the file, or give the machine more memory") from e


def check(files, image_folder=None, decode: bool = False, num_workers: int = 0, tokenizer=None,
          max_length: int = 2048, image_tokens: int = 1, system: str | None = None) -> str:
    """Validate everything; raise LlavaMinError listing every problem, else return a one-line summary.
    """
    samples = Samples(files)
    found = FileIndex()
    bad = {}
    images = []          # (sample index, path) of every image
    with_image = 0
    several = 0
    for index, sample in enumerate(samples.scan()):
        problems = sample_problems(sample, image_folder, found)
        if problems:
            bad[index] = "; ".join(problems)
            continue
        paths = image_paths(sample, image_folder)
        images += [(index, path) for path in paths]
        with_image += bool(paths)
        several += len(paths) > 1
    if decode:
        bad = dict(sorted({**bad, **decode_images(images, num_workers)}.items()))
    if bad:
        raise LlavaMinError(problem_report(samples, bad, image_folder))
    summary = f"{len(samples)} samples OK ({with_image} with an image"
    if several:
        summary += f", {several} of them with several: {len(images)} images in all"
    summary += f", {len(samples) - with_image} text-only"
    if decode:
        summary += ", every image decodes"
    summary += ")"
    if tokenizer is not None:
        tok = Tokenizer(tokenizer)
        summary += "; " + _cut_summary(samples, tok, max_length, image_tokens, system)
    return summary


def _cut_summary(samples: Samples, tok: Tokenizer, max_length: int, image_tokens: int,
                 system: str | None) -> str:
    """How many samples max_length cuts (and how many images that leaves out), and how many it
    leaves unsupervised."""
    truncated = 0
    unsupervised = 0
    left_out = 0
    for i in range(len(samples)):
        conversations = samples[i]["conversations"]
        ids, labels, full = tokenize(tok, conversations, max_length, system, image_tokens)
        if all(label == IGNORE_INDEX for label in labels):
            unsupervised += 1
        elif len(ids) < full:
            truncated += 1
            left_out += len(image_files(samples[i])) - ids.count(IMAGE_TOKEN_INDEX)
    text = f"at max_length {max_length} (image = {image_tokens} positions): {truncated} cut short"
    if left_out:
        text += f" ({left_out} images left out)"
    return text + f", {unsupervised} with no supervised token (dropped in training)"


def show(files, index: int, tokenizer=None, image_folder=None, max_length: int = 2048,
         image_tokens: int = 1, system: str | None = None) -> str:
    """One sample rendered as the model sees it, ⟦supervised⟧ marked, each image in its place."""
    samples = Samples(files)
    # Read (and check) every file, keeping only the offsets.
    for _ in samples.scan():
        pass
    if not -len(samples) <= index < len(samples):
        raise LlavaMinError(f"--index {index} is out of range: {len(samples)} samples in "
                            f"{samples.names()}")
    index %= len(samples)
    sample = samples[index]
    lines = [describe(samples, index, image_folder)]
    problems = sample_problems(sample)
    if problems:
        as_json = json.dumps(sample, ensure_ascii=False, indent=1)
        return "\n".join(lines + [f"bad: {'; '.join(problems)}", as_json])
    for k, path in enumerate(image_paths(sample, image_folder), start=1):
        try:
            width, height = load_image(path).size
            lines.append(f"image {k}: {width}x{height} px")
        except LlavaMinError as e:
            lines.append(f"image {k}: {e}")
    if tokenizer is None:
        conversations = json.dumps(sample["conversations"], ensure_ascii=False, indent=1)
        hint = "(give --tokenizer to see the tokens and labels)"
        return "\n".join(lines + [conversations, hint])
    tok = Tokenizer(tokenizer)
    ids, labels, full = tokenize(tok, sample["conversations"], max_length, system, image_tokens)
    supervised = sum(label != IGNORE_INDEX for label in labels)
    positions = llm_positions(ids, image_tokens)
    counts = f"{len(ids)} ids, {positions} LLM positions (image = {image_tokens})"
    line = f"tokens: {counts}; {supervised} supervised"
    if len(ids) < full:
        line += f"; truncated from {full} ids at max_length {max_length}"
    lines.append(line)
    # <s> decodes to nothing: it is printed first.
    bos = "<s>" * (ids[:1] == [tok.bos_id])
    lines.append("-" * 40 + "\n" + bos + _render(tok, ids, labels, image_tokens))
    return "\n".join(lines)


def _render(tok: Tokenizer, ids: list[int], labels: list[int], image_tokens: int) -> str:
    """Runs of equal supervision (None: an image placeholder), decoded together; ⟦...⟧ marks what
    the loss sees."""
    def kind(pair):
        if pair[0] == IMAGE_TOKEN_INDEX:
            return None
        return pair[1] != IGNORE_INDEX

    text = []
    image = 0
    for supervised, run in groupby(zip(ids, labels), kind):
        if supervised is None:
            for _ in run:
                image += 1
                text.append(f"[image {image}: {image_tokens} positions]")
            continue
        piece = tok.decode([token for token, _ in run]).replace("\n", "↵\n")
        if supervised:
            piece = f"⟦{piece}⟧"
        text.append(piece)
    return "".join(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m llava_min.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    commands = (("check", "validate every sample (and decode every image with --decode)"),
                ("show", "print one sample as the model sees it, supervised tokens marked"))
    for name, help_text in commands:
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--data", nargs="+", required=True, help="LLaVA JSON (a list) or JSONL files")
        c.add_argument("--image-folder", default=None)
        c.add_argument("--tokenizer", default=None,
                       help="sentencepiece model (check: also count truncation)")
        c.add_argument("--max-length", type=int, default=2048)
        c.add_argument("--image-tokens", type=int, default=1,
                       help="LLM positions per image (ViT patches)")
        c.add_argument("--system", default=None)
        if name == "check":
            c.add_argument("--decode", action="store_true",
                           help="decode every image, in worker processes")
            c.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
        else:
            c.add_argument("--index", type=int, required=True,
                           help="sample number in the data (0-based)")
    args = p.parse_args(argv)
    try:
        if args.command == "check":
            print(check(args.data, args.image_folder, args.decode, args.num_workers, args.tokenizer,
                        args.max_length, args.image_tokens, args.system))
        else:
            print(show(args.data, args.index, args.tokenizer, args.image_folder, args.max_length,
                       args.image_tokens, args.system))
    except ValueError as e:  # LlavaMinError: the message names the culprit and the fix
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
