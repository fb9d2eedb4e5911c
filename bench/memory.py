"""Memory of one training step, with and without gradient checkpointing, llava-min against transformers.

    python bench/memory.py

Same weights, batch and stage-2 setting as bench/train_step.py (ViT frozen). Two measurements, both of tensor
bytes allocated by the step itself (the weights exist before it and are not counted):

  * saved for backward: every tensor autograd keeps between forward and backward, seen through
    torch.autograd.graph.saved_tensors_hooks and counted once per storage, parameters excluded. This is what
    checkpointing trades for recomputation, measured exactly and independently of the allocator.
  * peak: the high-water mark of live tensor bytes from the start of forward to the end of backward
    (gradients and transient tensors such as transformers' full fp32 logits included), from the CPU
    allocations and frees that torch.profiler records with profile_memory=True.

Both are deterministic on CPU (unlike peak RSS, which the C allocator's caching and the other model living
in the same process would blur). Printed in MiB, with the ratios transformers / llava-min (> 1: llava-min
needs less) and checkpointing on / off.
"""
from __future__ import annotations

import argparse

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from common import load_pair, machine, set_checkpointing, setup_threads, sft_batch
from llava_min.tools.memory import saved_activation_bytes

MiB = 2 ** 20


def peak_bytes(step) -> int:
    """Highest sum of live tensor bytes allocated during forward + backward (CPU allocator events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step().backward()
    # Every allocation and free is an Allocation node of the profiler's event tree (the records behind
    # torch.profiler's memory timeline), with its signed size; their running sum in time order is the
    # live total, starting from 0 when profiling starts.
    sizes = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a tiny model pair: the code path, in seconds")
    args = parser.parse_args()
    setup_threads(args.threads)
    print(f"memory | {machine()}")

    ours, hf = load_pair(train=True)
    batch_ours, batch_theirs = sft_batch()
    B, T = batch_theirs["input_ids"].shape
    grads = sum(p.numel() * p.element_size() for p in ours.parameters() if p.requires_grad)
    print(f"  batch {B} x {T} LLM positions, fp32, ViT frozen; MiB of tensors allocated by one step, "
          f"{grads / MiB:.1f} MiB of it the parameters' gradients (the same in both)")

    results = {}
    for checkpointing in (False, True):
        set_checkpointing(ours, hf, checkpointing)
        for name, model, batch in (("llava-min", ours, batch_ours), ("transformers", hf, batch_theirs)):
            def step():
                return model(**batch).loss

            step().backward()                      # warm-up: lazy initialisation is not the step's memory
            model.zero_grad(set_to_none=True)      # gradients are allocated inside the measured step
            saved, loss = saved_activation_bytes(model, step)
            loss.backward()
            model.zero_grad(set_to_none=True)
            peak = peak_bytes(step)
            results[name, checkpointing] = saved, peak
            print(f"  {name:<13} checkpointing {'on ' if checkpointing else 'off'}  saved for backward "
                  f"{saved / MiB:8.1f} MiB   peak {peak / MiB:8.1f} MiB")

    for checkpointing in (False, True):
        (s_o, p_o), (s_t, p_t) = results["llava-min", checkpointing], results["transformers", checkpointing]
        print(f"  checkpointing {'on ' if checkpointing else 'off'}: transformers / llava-min  saved "
              f"{s_t / s_o:.2f}x   peak {p_t / p_o:.2f}x")
    for name in ("llava-min", "transformers"):
        (s_off, p_off), (s_on, p_on) = results[name, False], results[name, True]
        print(f"  {name:<13} checkpointing on / off: saved {s_on / s_off:.2f}   peak {p_on / p_off:.2f}")


if __name__ == "__main__":
    main()
