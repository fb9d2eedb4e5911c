"""Benchmark-TSV evaluation speed: llava-min's eval at --batch-size 1 and 16, and transformers'
Llava answering the same prompts one by one (as VLMEvalKit's model wrappers run), on the same file
and weights.

    python bench/eval.py                 # 64 rows of an MMBench-layout TSV (16 questions, circular)
    python bench/eval.py --rows 128 --repeats 5
    python bench/eval.py --smoke               # a tiny model pair: the code path, in seconds

The file: VLMEvalKit's MMBench layout (4 options, circular copies whose images are references), 224
px PNGs in base64. llava-min runs its own eval path (`llava_min.eval.answer_rows`: prompts built
and images decoded per batch, left-padded greedy generation with the static cache, 5 new tokens as
VLMEvalKit asks for multiple choice). transformers gets the identical token ids (the image
placeholder expanded to its patches) and the same pixels, one row per generate() call. The
predictions of all three are asserted equal before anything is timed. Printed: rows/s (median of
--repeats whole passes over the file), and the ratios. Goal (issue 19): batch 16 at least 4x batch
1 on CPU.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from common import (IMAGE_SIZE, IMAGE_TOKEN_ID, LLM_CONFIG, N_PATCHES, SMOKE, expand_image_tokens,
                    load_pair, machine, setup_threads)
from _bench_tsv import MCQ_COLUMNS, VQA_COLUMNS, png_b64, write_tsv   # tests/, on the path via common
from llava_min import vlmeval
from llava_min.chat import prompt_ids
from llava_min.eval import Appender, answer_rows, decode_rows
from llava_min.image import preprocess
from llava_min.tools.tokenizer_train import train as train_tokenizer

WORDS = ["cat", "dog", "bird", "fish", "red", "blue", "green", "yellow", "circle", "square", "sky",
         "tree"]


def mcq_tsv(folder: Path, rows: int) -> Path:
    """`rows` MMBench rows: rows // 4 questions, each with its 3 circular copies (image by
    reference)."""
    table = []
    for q in range(1, rows // 4 + 1):
        texts = [WORDS[(q + k) % len(WORDS)] for k in range(4)]
        for k in range(4):
            shifted = texts[k:] + texts[:k]
            row = {"index": q + k * 1_000_000, "question": f"Which word goes with picture {q}?",
                   "answer": "ABCD"[shifted.index(texts[0])], "category": "bench",
                   "l2-category": "coarse_perception", "split": "dev", "image": str(q)}
            row.update(dict(zip("ABCD", shifted)))
            if k == 0:
                row["image"] = png_b64((q * 37 % 256, q * 91 % 256, 120), IMAGE_SIZE)
            table.append(row)
    return write_tsv(folder / "MMBench_bench.tsv", MCQ_COLUMNS, table)


def vqa_tsv(folder: Path, rows: int) -> Path:
    """`rows` TextVQA-like rows, ten answers each, one image per row."""
    table = []
    for q in range(rows):
        table.append({"index": q, "question": f"Which word is written in picture {q}?",
                      "answer": [WORDS[q % len(WORDS)]] * 10, "category": "bench",
                      "image": png_b64((q * 53 % 256, 60, q * 29 % 256), IMAGE_SIZE)})
    return write_tsv(folder / "TextVQA_bench.tsv", VQA_COLUMNS, table)


def tokenizer(folder: Path):
    corpus = folder / "corpus.json"
    text = " ".join(WORDS) + " Which word goes with picture? Answer with the option's letter from the given " \
                             "choices directly. A. B. C. D."
    corpus.write_text('[{"conversations": [{"from": "human", "value": "%s"}, {"from": "gpt", "value": "%s"}]}]'
                      % (text, text))
    return train_tokenizer([corpus], 400, folder / "tokenizer.model", threads=1)


def ours_pass(model, tok, bench, batch_size: int, new_tokens: int, folder: Path,
              workers: int) -> list[str]:
    """One pass of llava-min's eval over every row; the predictions in row order."""
    args = SimpleNamespace(batch_size=batch_size, max_new_tokens=new_tokens, image_folder=None,
                           skip_bad=False, num_workers=workers)
    appender = Appender(folder / f"pass-{time.monotonic_ns()}.jsonl")
    try:
        rows = list(range(len(bench.rows)))
        results = answer_rows(model, tok, bench, rows, args, appender, show=False)
    finally:
        appender.close()
    return [results[i]["prediction"] for i in range(len(bench.rows))]


def theirs_pass(hf, model, tok, bench, new_tokens: int) -> list[str]:
    """transformers, one row per generate(): the same ids and pixels llava-min builds for that
    row."""
    predictions = []
    # ids no text has, as llava-min masks them
    suppress = list(range(tok.vocab_size, LLM_CONFIG.vocab_size))
    for i in range(len(bench.rows)):
        images = vlmeval.load_images(bench, i)
        pixels = torch.stack([preprocess(im, model.config.image_size, mode=model.config.image_mode)
                              for im in images])
        prompt = vlmeval.build_prompt(bench.rows[i], bench.kind)
        ids = torch.tensor([prompt_ids(tok, prompt, len(images))])
        hf_ids, hf_mask, _ = expand_image_tokens(ids, torch.ones_like(ids), N_PATCHES,
                                                 IMAGE_TOKEN_ID)
        out = hf.generate(input_ids=hf_ids, pixel_values=pixels, attention_mask=hf_mask,
                          do_sample=False, max_new_tokens=new_tokens,
                          eos_token_id=model.config.stop_ids, pad_token_id=model.config.stop_ids[0],
                          suppress_tokens=suppress)
        predictions += decode_rows(tok, model, out[:, hf_ids.shape[1]:])
    return predictions


def measure(title: str, runs: dict, rows: int, repeats: int) -> dict[str, float]:
    """Assert the runs' predictions equal, then time `repeats` interleaved passes of each; rows/s."""
    predictions = {name: run() for name, run in runs.items()}
    first = next(iter(predictions.values()))
    same = all(p == first for p in predictions.values())
    print(f"  {title}: same predictions: {same}; rows 0-1: {first[:2]}")
    assert same, "\n".join(f"  {name}: {p}" for name, p in predictions.items())
    times = {name: [] for name in runs}
    for r in range(repeats):
        # alternate the order, so that drifting load hits all alike
        order = list(runs)
        if r % 2:
            order.reverse()
        for name in order:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    rate = {name: rows / statistics.median(t) for name, t in times.items()}
    for name, value in rate.items():
        print(f"  {title}, {name:<24} {value:8.2f} rows/s   (median of {len(times[name])} "
              f"passes, min {min(times[name]):.2f} s, max {max(times[name]):.2f} s per pass)")
    return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="rows of the MMBench TSV (4 per question)")
    parser.add_argument("--vqa-rows", type=int, default=32, help="rows of the VQA TSV")
    parser.add_argument("--vqa-tokens", type=int, default=48,
                        help="new tokens per VQA answer (random weights rarely stop early)")
    parser.add_argument("--batch-size", type=int, default=16, help="the batched setting")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0,
                        help="loader workers of llava-min's eval")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model pair and 8 rows: the code path")
    args = parser.parse_args()
    if args.smoke:
        args.rows = min(args.rows, 8)
        args.vqa_rows = min(args.vqa_rows, 4)
        args.vqa_tokens = min(args.vqa_tokens, 4)
        args.repeats = 1
    setup_threads(args.threads)
    print(f"eval | {machine()}")
    b = args.batch_size
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        folder = Path(tmp)
        tok = tokenizer(folder)
        ours, hf = load_pair()
        ours.config.stop_ids = [tok.im_end_id, tok.eos_id]
        ours.config.text_vocab_size = tok.vocab_size
        ours.config.image_size = IMAGE_SIZE
        settings = [(vlmeval.read_tsv(mcq_tsv(folder, args.rows)), vlmeval.MAX_NEW_TOKENS["mcq"]),
                    (vlmeval.read_tsv(vqa_tsv(folder, args.vqa_rows)), args.vqa_tokens)]
        for bench, n in settings:
            title = f"{bench.name} ({bench.kind}, {len(bench.rows)} rows, up to {n} tokens)"

            def run(batch, bench=bench, n=n):
                return ours_pass(ours, tok, bench, batch, n, folder, args.workers)

            runs = {"llava-min batch 1": lambda run=run: run(1),
                    f"llava-min batch {b}": lambda run=run: run(b),
                    "transformers one by one": lambda bench=bench, n=n: theirs_pass(hf, ours, tok, bench, n)}
            one, batched, theirs = measure(title, runs, len(bench.rows), args.repeats).values()
            print(f"  {title}: batch {b} / batch 1: {batched / one:.2f}x; batch {b} / transformers "
                  f"one by one: {batched / theirs:.2f}x; batch 1 / transformers: {one / theirs:.2f}x")
    print(f"  ({IMAGE_SIZE} px, {N_PATCHES} image tokens per row, greedy, fp32)")
    if SMOKE:
        print("  (--smoke: a tiny model pair; these numbers measure nothing)")


if __name__ == "__main__":
    main()
