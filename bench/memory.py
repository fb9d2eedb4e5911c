"""Memory of one training step, with and without gradient checkpointing, llava-min against
transformers.

    python bench/memory.py [--account]

Same weights, batch and stage-2 setting as bench/train_step.py (ViT frozen). Two measurements, both
of tensor bytes allocated by the step itself (the weights exist before it and are not counted):

  * saved for backward: every tensor autograd keeps between forward and backward, seen through
    torch.autograd.graph.saved_tensors_hooks and counted once per storage, parameters excluded.
    This is what checkpointing trades for recomputation, measured exactly and independently of the
    allocator.
  * peak: the high-water mark of live tensor bytes from the start of forward to the end of
    backward (gradients and transient tensors such as transformers' full fp32 logits included),
    from the CPU allocations and frees that torch.profiler records with profile_memory=True.

--account adds, for llava-min with checkpointing on, every saved tensor (bytes, shape, dtype, the
llava_min line that saved it) and what is live at the peak besides the gradients (bytes by the op,
the llava_min function and the backward node that allocated it): the figures traced to lines.

Both are deterministic on CPU (unlike peak RSS, which the C allocator's caching and the other model
living in the same process would blur). Printed in MiB, with the ratios transformers / llava-min
(> 1: llava-min needs less) and checkpointing on / off, of the peak and of the peak less the
gradients (the activations' part; all gradients exist by the end of backward in both models).
"""
from __future__ import annotations

import argparse
import collections
import traceback

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from common import load_pair, machine, set_checkpointing, setup_threads, sft_batch
from llava_min.tools.memory import saved_activation_bytes

MiB = 2 ** 20
ON_OFF = {True: "on ", False: "off"}


def allocations(prof) -> list:
    """(time, signed bytes, address, event node) of every allocation and free, in time order. Each
    is an Allocation node of the profiler's event tree (the records behind torch.profiler's memory
    timeline)."""
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            events.append((node.start_time_ns, fields.alloc_size, fields.ptr, node))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    return sorted(events, key=lambda e: e[0])


def peak_bytes(step, with_stack: bool = False):
    """Highest sum of live tensor bytes allocated during forward + backward (CPU allocator events),
    and the live allocations at that moment (address -> (bytes, event node)). The running sum of
    the signed sizes in time order is the live total, starting from 0 when profiling starts."""
    activities = [ProfilerActivity.CPU]
    with profile(activities=activities, profile_memory=True, with_stack=with_stack) as prof:
        step().backward()
    live = peak = 0
    alive = {}
    at_peak = {}
    for _, size, address, node in allocations(prof):
        live += size
        if size > 0:
            alive[address] = (size, node)
        else:
            alive.pop(address, None)
        if live > peak:
            peak = live
            at_peak = dict(alive)
    return peak, at_peak


def origin(node) -> tuple[str, str, str]:
    """Who allocated: the innermost op, llava_min function and backward node above an Allocation
    node."""
    op = function = backward = "-"
    parent = node.parent
    while parent is not None:
        if op == "-" and parent.tag == _EventType.TorchOp:
            op = parent.name
        if function == "-" and parent.tag == _EventType.PyCall and "llava_min/" in parent.name:
            function = parent.name.split("llava_min/")[-1]
        if backward == "-" and "evaluate_function" in parent.name:
            backward = parent.name.split(":")[-1].strip()
        parent = parent.parent
    return op, function, backward


def saved_tensors(model, step) -> list:
    """(bytes, shape, dtype, the llava_min line that saved it) of each storage autograd saves in
    forward, parameters left out (as saved_activation_bytes counts them)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in saved:
            frames = [f for f in traceback.extract_stack()[:-1] if "llava_min/" in f.filename]
            where = "-"
            if frames:
                file = frames[-1].filename.split("llava_min/")[-1]
                where = f"{file}:{frames[-1].lineno} {frames[-1].line}"
            saved[storage.data_ptr()] = (storage.nbytes(), tuple(t.shape), str(t.dtype), where)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sorted(saved.values(), key=lambda row: -row[0])


def account(model, step) -> None:
    """Print what the step keeps for backward, tensor by tensor, and what is live at its peak."""
    model.zero_grad(set_to_none=True)
    rows = saved_tensors(model, step)
    print(f"  saved for backward, per tensor ({sum(r[0] for r in rows) / MiB:.2f} MiB):")
    for nbytes, shape, dtype, where in rows:
        print(f"    {nbytes / MiB:7.3f} MiB  {str(shape):18} {dtype:15} {where[:90]}")
    # The gradients' addresses after the step name them among the allocations live at the peak
    model.zero_grad(set_to_none=True)
    peak, at_peak = peak_bytes(step, with_stack=True)
    grads = {p.grad.untyped_storage().data_ptr(): name for name, p in model.named_parameters()
             if p.grad is not None}
    model.zero_grad(set_to_none=True)
    grad_bytes = sum(size for address, (size, _) in at_peak.items() if address in grads)
    allocated = sum(a in grads for a in at_peak)
    print(f"  live at the peak ({peak / MiB:.2f} MiB): gradients {grad_bytes / MiB:.2f} MiB "
          f"({allocated} of {len(grads)} allocated), the rest by who allocated it:")
    groups = collections.Counter()
    counts = collections.Counter()
    for address, (size, node) in at_peak.items():
        if address not in grads:
            groups[origin(node)] += size
            counts[origin(node)] += 1
    for (op, function, backward), nbytes in groups.most_common():
        if nbytes >= 2 ** 14:
            count = counts[op, function, backward]
            print(f"    {nbytes / MiB:7.3f} MiB  x{count:<3} {op:22} {function:42} in {backward}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model pair: the code path, in seconds")
    parser.add_argument("--account", action="store_true",
                        help="llava-min checkpointed: each saved tensor, what is live at the peak")
    args = parser.parse_args()
    setup_threads(args.threads)
    print(f"memory | {machine()}")

    ours, hf = load_pair(train=True)
    batch_ours, batch_theirs = sft_batch()
    B, T = batch_theirs["input_ids"].shape
    grads = sum(p.numel() * p.element_size() for p in ours.parameters() if p.requires_grad)
    print(f"  batch {B} x {T} LLM positions, fp32, ViT frozen; MiB of tensors allocated by one "
          f"step, {grads / MiB:.1f} MiB of it the parameters' gradients (the same in both)")

    results = {}
    for checkpointing in (False, True):
        set_checkpointing(ours, hf, checkpointing)
        pair = (("llava-min", ours, batch_ours), ("transformers", hf, batch_theirs))
        for name, model, batch in pair:
            def step():
                return model(**batch).loss

            # A warm-up: lazy initialisation is not the step's memory. Gradients are allocated
            # inside the measured step.
            step().backward()
            model.zero_grad(set_to_none=True)
            saved, loss = saved_activation_bytes(model, step)
            loss.backward()
            model.zero_grad(set_to_none=True)
            peak, _ = peak_bytes(step)
            results[name, checkpointing] = saved, peak
            print(f"  {name:<13} checkpointing {ON_OFF[checkpointing]}  saved for backward "
                  f"{saved / MiB:8.1f} MiB   peak {peak / MiB:8.1f} MiB")

    if args.account:
        set_checkpointing(ours, hf, True)
        print("llava-min, checkpointing on:")
        account(ours, lambda: ours(**batch_ours).loss)
    # Ratios of saved bytes, peaks, and peaks less the gradients (the activations' part)
    for checkpointing in (False, True):
        ours_saved, ours_peak = results["llava-min", checkpointing]
        their_saved, their_peak = results["transformers", checkpointing]
        print(f"  checkpointing {ON_OFF[checkpointing]}: transformers / llava-min  saved "
              f"{their_saved / ours_saved:.2f}x   peak {their_peak / ours_peak:.2f}x   "
              f"peak less gradients {(their_peak - grads) / (ours_peak - grads):.2f}x")
    for name in ("llava-min", "transformers"):
        saved_off, peak_off = results[name, False]
        saved_on, peak_on = results[name, True]
        print(f"  {name:<13} checkpointing on / off: saved {saved_on / saved_off:.2f}   peak "
              f"{peak_on / peak_off:.2f}   peak less gradients "
              f"{(peak_on - grads) / (peak_off - grads):.2f}")


if __name__ == "__main__":
    main()
