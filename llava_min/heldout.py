"""Held-out loss (--eval-data FILE [--eval-every N]): the training loss, on samples never trained on.

    held_out = heldout.from_args(args, tok, image_tokens, d)      # None without --eval-data
    record["eval_loss"] = held_out.loss(model, autocast, step)    # a collective: every rank calls it

Comparable across runs and resumes:
  * the order is fixed: sample i goes to rank i % world_size, in file order, never shuffled;
  * nothing random is drawn: dropout is off, and the RNG state is put back afterwards, so the
    training that follows is bit-identical with or without it;
  * the reduction is the training loss's: the summed loss over the global count of supervised
    tokens, so any split of the set over ranks and batches gives the same number.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from . import checkpoint, dist, fsdp
from .data import LLaVADataset, collate
from .llava import trained_positions
from .loader import Loader


def rank_batches(n: int, batch_size: int, rank: int, world_size: int) -> tuple[list[list[int]], int]:
    """This rank's batches of sample indices, and how many of them count. Under FSDP every forward is
    a collective, so all ranks run as many batches: a rank whose share is a batch shorter runs a
    repeat that is left out of the sums."""
    share = list(range(rank, n, world_size))
    batches = [share[i:i + batch_size] for i in range(0, len(share), batch_size)]
    most = math.ceil(math.ceil(n / world_size) / batch_size)
    real = len(batches)
    batches += [[0]] * (most - real)
    return batches, real


class HeldOut:
    """A held-out data set cut into this rank's fixed batches, with a loader of its own."""

    def __init__(self, dataset, batch_size: int, d: dist.Dist, num_workers: int = 0,
                 timeout: float = 600, pin_memory: bool = False):
        self.dataset = dataset
        self.d = d
        batches, self.real = rank_batches(len(dataset), batch_size, d.rank, d.world_size)
        collate_fn = functools.partial(collate, shared=num_workers > 0)
        self.loader = Loader(dataset, batches, collate_fn, num_workers=num_workers, timeout=timeout,
                             pin_memory=pin_memory, seed=0)

    def loss(self, model: torch.nn.Module, autocast, step: int) -> float:
        """The held-out loss of `model` (the module, not its DDP wrapper) after step `step`."""
        stats = self.sums(model, autocast, step)
        dist.all_reduce(self.d, stats, what=f"held-out loss at step {step}")
        return stats[0].item() / max(stats[1].item(), 1.0)

    def sums(self, model: torch.nn.Module, autocast, step: int) -> torch.Tensor:
        """This rank's (summed loss, supervised tokens), float64."""
        d = self.d
        device = d.device
        was_training = model.training
        rng = checkpoint.capture_rng_state()
        model.eval()                                   # no dropout (LoRA's): the same number each time
        stats = torch.zeros(2, device=device, dtype=torch.float64)   # loss sum, supervised tokens
        # Under FSDP each forward all-gathers the layers: a collective, named if it fails.
        sharded = fsdp.is_sharded(model)
        with torch.no_grad():
            for i, batch in enumerate(self.loader):
                d.heartbeat(step, f"held-out batch {i + 1}")
                name = f"held-out forward (FSDP all-gather) {i + 1} at step {step}"
                gathering = contextlib.nullcontext()
                if sharded:
                    gathering = dist.collective(d, name)
                with gathering, autocast:
                    o = model(batch["input_ids"].to(device), _pixels(batch, device),
                              labels=batch["labels"].to(device),
                              attention_mask=batch["attention_mask"].to(device))
                # The repeats that even out the ranks count for nothing.
                if i < self.real:
                    stats[0] += o.loss_sum.detach().double()
                    stats[1] += trained_positions(batch["labels"], batch["attention_mask"]).sum().item()
        model.train(was_training)
        checkpoint.restore_rng_state(rng)
        return stats


def _pixels(batch: dict, device) -> torch.Tensor | None:
    if batch["pixel_values"] is None:
        return None                                    # a batch of text-only samples
    return batch["pixel_values"].to(device)


def from_args(args, tok, image_tokens: int, preprocessing, d: dist.Dist) -> HeldOut | None:
    """--eval-data read with the training data's settings (tokenizer, image size and mode, the
    tower's preprocessing, lengths, system prompt)."""
    if not args.eval_data:
        return None
    dataset = LLaVADataset(args.eval_data, tok, args.image_folder, image_size=args.image_size,
                           image_mode=args.image_mode, max_length=args.max_length,
                           image_tokens=image_tokens, system=args.system,
                           skip_bad=args.skip_bad_samples, preprocessing=preprocessing)
    d.print0("held-out " + dataset.report())
    return HeldOut(dataset, args.batch_size, d, num_workers=args.num_workers,
                   timeout=args.loader_timeout, pin_memory=d.device.type == "cuda")
