"""One training step (forward with labels + backward), llava-min against transformers, same weights, same batch.

    python bench/train_step.py                   # 2 threads, 10 interleaved steps each
    python bench/train_step.py --repeats 20 --profile

The stage-2 setting: ViT frozen, projector and LLM trained, labels -100 on the image, the prompt and the
first half of each row's text (see bench/common.py for the shape). transformers computes fp32 logits and
their cross-entropy on every position; llava-min only where a label is supervised. Printed: median step
time of each, the speed ratio (> 1: llava-min faster), and with --profile where each one's time goes.
Goal (issue 10): >= 1.2x.
"""
from __future__ import annotations

import argparse

import torch

from common import interleaved, load_pair, machine, report, set_checkpointing, setup_threads, sft_batch


def step_fns(ours, hf, batch_ours, batch_theirs):
    def ours_step():
        ours.zero_grad(set_to_none=True)
        ours(**batch_ours).loss.backward()

    def theirs_step():
        hf.zero_grad(set_to_none=True)
        hf(**batch_theirs).loss.backward()

    return {"llava-min": ours_step, "transformers": theirs_step}


def profile(name, fn, rows: int = 15):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n--- {name}: top ops by self CPU time ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a tiny model pair: the code path, in seconds")
    parser.add_argument("--grad-checkpointing", action="store_true", help="both models recompute each block")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables for one step of each")
    args = parser.parse_args()
    setup_threads(args.threads)
    print(f"train step | {machine()}")

    ours, hf = load_pair(train=True)
    set_checkpointing(ours, hf, args.grad_checkpointing)
    batch_ours, batch_theirs = sft_batch()
    B, T = batch_theirs["input_ids"].shape
    supervised = int((batch_ours["labels"][:, 1:] != -100).sum())
    print(f"  batch {B} x {T} LLM positions ({supervised} supervised), fp32, ViT frozen, "
          f"grad checkpointing {'on' if args.grad_checkpointing else 'off'}")

    # Same numbers before timing anything: the comparison is only fair on identical work.
    with torch.no_grad():
        a, b = ours(**batch_ours).loss, hf(**batch_theirs).loss
    assert abs(a.item() - b.item()) < 1e-3, f"losses differ: llava-min {a.item()} vs transformers {b.item()}"
    print(f"  loss llava-min {a.item():.5f}  transformers {b.item():.5f}")

    fns = step_fns(ours, hf, batch_ours, batch_theirs)
    times = interleaved(fns, args.repeats)
    report("forward + backward", times)
    if args.profile:
        for name, fn in fns.items():
            profile(name, fn)


if __name__ == "__main__":
    main()
