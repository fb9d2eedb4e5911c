"""Greedy generation after an image prompt, llava-min against transformers, same weights, same tokens.

    python bench/generate.py                      # 48 new tokens; one prompt, then a left-padded batch of 8
    python bench/generate.py --new-tokens 64 --batch 16 --repeats 10 --profile
    python bench/generate.py --compile            # llava-min's LLM forward through torch.compile

Both run greedy decoding with a KV cache to exactly --new-tokens tokens (no stop id can end either early);
the bench asserts that the two produce identical tokens before timing anything, and prints them.
Printed per setting: the median time of the whole generate() call and the speed ratio, and the decoding
cost per token, (time for N tokens - time for 1 token) / (N - 1), which leaves out the prefill (ViT,
projector, prompt). Goal (issue 10): >= 1.2x for one prompt, >= 1.5x for a left-padded batch of 8, identical tokens.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import (IMAGE_SIZE, IMAGE_TOKEN_ID, LLM_CONFIG, N_PATCHES, expand_image_tokens, interleaved,
                    load_pair, machine, report, setup_threads)
from llava_min import IMAGE_TOKEN_INDEX

NO_STOP = [-1]   # a stop id no token equals: llava-min runs to max_new_tokens, as transformers without eos


def prompts(batch: int, seed: int = 0):
    """Rows [bos, <image>, question...] of different lengths (16 to 48 text tokens), left-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = [48] if batch == 1 else torch.linspace(16, 48, batch).round().long().tolist()
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        row = torch.randint(3, LLM_CONFIG.vocab_size - 1, (n,), generator=g)
        row[0], row[1] = 1, IMAGE_TOKEN_INDEX
        ids[b, width - n:], mask[b, width - n:] = row, 1
    pixel_values = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return ids, mask, pixel_values


def generate_fns(ours, hf, ids, mask, pixel_values):
    """name -> f(new_tokens) returning the (B, new_tokens) new ids."""
    hf_ids, hf_mask, _ = expand_image_tokens(ids, mask, N_PATCHES, IMAGE_TOKEN_ID, padding_side="left")

    def ours_fn(n):
        return ours.generate(ids, pixel_values, max_new_tokens=n, attention_mask=mask, stop_ids=NO_STOP)

    def theirs_fn(n):
        out = hf.generate(input_ids=hf_ids, pixel_values=pixel_values, attention_mask=hf_mask, max_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        return out[:, hf_ids.shape[1]:]

    return {"llava-min": ours_fn, "transformers": theirs_fn}


def bench(title, fns, new_tokens, repeats):
    ours, theirs = fns["llava-min"](new_tokens), fns["transformers"](new_tokens)
    assert ours.shape == theirs.shape == (ours.shape[0], new_tokens), (ours.shape, theirs.shape)
    same = torch.equal(ours, theirs)
    print(f"  {title}: identical tokens: {same}; row 0: {ours[0].tolist()}")
    assert same, f"tokens differ:\n  llava-min    {ours.tolist()}\n  transformers {theirs.tolist()}"

    full = interleaved({k: (lambda f=f: f(new_tokens)) for k, f in fns.items()}, repeats)
    one = interleaved({k: (lambda f=f: f(1)) for k, f in fns.items()}, repeats)
    report(f"{title}, {new_tokens} tokens", full)
    per_token = {k: (statistics.median(full[k]) - statistics.median(one[k])) / (new_tokens - 1) for k in full}
    print(f"  {title}, decoding per token: llava-min {per_token['llava-min'] * 1e3:.2f} ms, transformers "
          f"{per_token['transformers'] * 1e3:.2f} ms: {per_token['transformers'] / per_token['llava-min']:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8, help="rows of the batched setting")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a tiny model pair: the code path, in seconds")
    parser.add_argument("--compile", action="store_true", help="llava-min's LLM forward_hidden through torch.compile")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables for one call of each")
    args = parser.parse_args()
    setup_threads(args.threads)
    print(f"generate | {machine()}")

    ours, hf = load_pair()
    hf.generation_config.eos_token_id = None   # run to max_new_tokens, as llava-min with NO_STOP
    if args.compile:
        # dynamic=True: one graph serves every cache length instead of one compilation per decoding step.
        ours.llm.forward_hidden = torch.compile(ours.llm.forward_hidden, dynamic=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for batch in (1, args.batch):
                ids, mask, pixel_values = prompts(batch)
                ours.generate(ids, pixel_values, max_new_tokens=3, attention_mask=mask, stop_ids=NO_STOP)
        print(f"  llava-min: LLM forward compiled with torch.compile in {time.perf_counter() - t0:.0f} s")

    with torch.inference_mode():
        for batch in (1, args.batch):
            ids, mask, pixel_values = prompts(batch)
            title = "1 prompt" if batch == 1 else f"batch of {batch}, left-padded"
            print(f"  {title}: up to {ids.shape[1] - 1 + N_PATCHES} prompt positions, greedy, fp32")
            fns = generate_fns(ours, hf, ids, mask, pixel_values)
            bench(title, fns, args.new_tokens, args.repeats)
            if args.profile:
                from train_step import profile
                for name, f in fns.items():
                    profile(f"{name}, {title}", lambda f=f: f(args.new_tokens))


if __name__ == "__main__":
    main()
