"""Stage 1 of LLaVA training: align the projector on image captions (LLM and ViT frozen).

One process:
    python train.py --data data/shapes/pretrain.json --image-folder data/shapes \\
        --tokenizer data/shapes/tok.model --llm-config tiny --vit-config tiny --out out/stage1
Several GPUs / nodes (every rank reads and tokenizes its own samples lazily; nothing is preprocessed up front):
    torchrun --nproc_per_node 4 train.py --data blip_laion_cc_sbu_558k.json --image-folder LLaVA-Pretrain/images \\
        --tokenizer internlm2/tokenizer.model --llm internlm2-chat-7b --vit dinov2-large --out out/pretrain

finetune.py (stage 2) runs this same script with its own defaults (`main(stage=2)`). Read it top to bottom:
arguments, distributed set-up, data, model, optimiser, resume, the loop, saving.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation on long runs

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from tqdm import tqdm  # noqa: E402

from llava_min import checkpoint, dist, fsdp  # noqa: E402
from llava_min.data import LLaVADataset, collate, collate_packed  # noqa: E402
from llava_min.dinov2 import DINOv2, load_config as vit_config  # noqa: E402
from llava_min.internlm2 import InternLM2, load_config as llm_config  # noqa: E402
from llava_min.llava import CONFIG_FILE, PARTS, LLaVA, LLaVAConfig, parse_parts, trained_positions  # noqa: E402
from llava_min.loader import Loader  # noqa: E402
from llava_min.lora import apply_lora  # noqa: E402
from llava_min.optim import (CosineSchedule, clip_gradients, gather_optimizer_state, make_optimizer,  # noqa: E402
                             param_groups)
from llava_min.plot import plot_loss  # noqa: E402
from llava_min.projector import Projector  # noqa: E402
from llava_min.sampler import GlobalBatchSampler  # noqa: E402
from llava_min.tokenizer import Tokenizer  # noqa: E402
from llava_min.tools import doctor, flops, hang, memory  # noqa: E402
from llava_min.weights import write_atomic, write_json  # noqa: E402

# Per-stage defaults (LLaVA-1.5 scripts/v1_5 and XTuner's internlm2_chat LLaVA configs).
STAGE_DEFAULTS = {1: dict(train="projector", lr=1e-3, batch_size=32),
                  2: dict(train="projector,llm", lr=2e-5, batch_size=16)}
# Settings a stage-2 run takes from its --init-from folder. Their flags default to None ("not given"), so a
# flag typed on the command line, abbreviated or not, always wins; without --init-from these defaults apply.
INHERITED = {"tokenizer": None, "image_size": 336, "image_mode": "pad", "max_length": 2048, "system": None}
SLOW_DISK_BYTES_PER_S = 20e6   # what a busy shared file system still writes: sizes the wait for rank 0's saves


def parse_args(stage: int, argv=None) -> argparse.Namespace:
    d = STAGE_DEFAULTS[stage]
    p = argparse.ArgumentParser(description=__doc__ if stage == 1 else sys.modules["__main__"].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="LLaVA-format JSON (a list) or JSONL files")
    p.add_argument("--image-folder", default=".", help="image paths in the data are relative to it")
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (inherited with --init-from)")
    p.add_argument("--llm", default=None, help="pretrained InternLM2 folder")
    p.add_argument("--llm-config", default=None,
                   help="fresh weights: preset (tiny, internlm2-1_8b, internlm2-7b) or config.json")
    p.add_argument("--vit", default=None, help="pretrained DINOv2 folder")
    p.add_argument("--vit-config", default=None,
                   help="fresh weights: preset (tiny, dinov2-small/-base/-large/-giant[-reg]) or config.json")
    p.add_argument("--projector", default=None, help="pretrained projector folder (XTuner or HF LLaVA names)")
    p.add_argument("--init-from", default=None, help="a folder written by train.py (stage 1 output)")
    p.add_argument("--train", default=d["train"], help="comma list of projector,llm,vit, or all")
    p.add_argument("--lora-r", type=int, default=0, help="train the LLM through LoRA adapters of this rank")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2 * r)")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-steps", type=int, default=None, help="length in optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (warm-up then cosine)")
    p.add_argument("--projector-lr", type=float, default=None, help="separate peak lr for the projector")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    p.add_argument("--max-length", type=int, default=None, help="cap on the LLM's sequence (default 2048; inherited)")
    p.add_argument("--image-size", type=int, default=None, help="square ViT input (default 336; inherited)")
    p.add_argument("--image-mode", choices=["pad", "crop"], default=None,
                   help="pad to square (LLaVA-1.5, the default) or centre crop; inherited")
    p.add_argument("--system", default=None, help="system prompt for every sample (inherited)")
    p.add_argument("--skip-bad-samples", action="store_true", help="drop (and count) bad samples instead of stopping")
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="drop (and count) samples with more than N images (default: no limit)")
    p.add_argument("--num-workers", type=int, default=4, help="loader worker processes; 0 = in the main process")
    p.add_argument("--loader-timeout", type=float, default=600, help="seconds a loader worker may be silent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimizer steps")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept in OUT/checkpoints")
    p.add_argument("--save-frozen", choices=["link", "copy", "ref"], default="link", help="frozen parts in OUT: "
                   "hard links to the source files (else copies), copies, or a symbolic link to the source folder")
    p.add_argument("--save-dtype", choices=["source", "float32", "bfloat16"], default="source",
                   help="dtype of the trained parts in OUT (default: their source checkpoint's; fp32 if fresh)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out")
    p.add_argument("--dist-timeout", type=float, default=600, help="timeout (s) of every collective")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute each block's activations in backward")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default bfloat16 on CUDA, float32 on CPU); trained weights stay fp32")
    p.add_argument("--pack", type=int, default=0, metavar="N", help="pack whole samples into rows of at most N "
                   "LLM positions (N >= --max-length), attention isolated per sample; --batch-size counts rows")
    p.add_argument("--zero", action="store_true", help="shard optimizer state across ranks (ZeRO-1)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state across "
                   "ranks (FSDP2 fully_shard, ZeRO-3's layout) instead of replicating them (DDP)")
    p.add_argument("--nan", choices=["stop", "skip"], default="stop", help="on a NaN/inf loss: stop, or skip the step")
    args = p.parse_args(argv)
    args.stage = stage
    return args


def inherit(args, init_dir: Path | None) -> list[str]:
    """Fill the INHERITED settings left at None: from the stage-1 folder's args.json, else the defaults."""
    saved = json.loads((init_dir / "args.json").read_text()) if init_dir and (init_dir / "args.json").exists() else {}
    if init_dir:
        saved["tokenizer"] = str(init_dir / "tokenizer.model")
    said = []
    for key, default in INHERITED.items():
        if getattr(args, key) is None:
            value = saved.get(key)
            if value is not None:
                said.append(f"{key}={value}")
            setattr(args, key, default if value is None else value)
    return said


def build_model(args, tok: Tokenizer, src: dict, parts: set[str], dtype: torch.dtype, device) -> LLaVA:
    """Each part read once, straight to the device, in its final dtype: fp32 for what trains (the optimizer's
    master weights), the compute dtype for what stays frozen (the LLM under LoRA included)."""
    def dtype_of(part: str) -> torch.dtype:
        return torch.float32 if part in parts and not (part == "llm" and args.lora_r) else dtype

    torch.manual_seed(args.seed)  # fresh weights identical on every rank and on resume
    llm = (InternLM2.from_pretrained(src["llm"], dtype=dtype_of("llm"), device=device) if src["llm"]
           else InternLM2(llm_config(args.llm_config)).to(device, dtype_of("llm")))
    vit = (DINOv2.from_pretrained(src["vit"], dtype=dtype_of("vit"), device=device) if src["vit"]
           else DINOv2(vit_config(args.vit_config)).to(device, dtype_of("vit")))
    projector = (Projector.from_pretrained(src["projector"], dtype=dtype_of("projector"), device=device)
                 if src["projector"] else
                 Projector(vit.config.hidden_size, llm.config.hidden_size).to(device, dtype_of("projector")))
    config = LLaVAConfig.read(args.init_from) if args.init_from else LLaVAConfig()
    model = LLaVA(llm, vit, projector, config)
    config.image_size, config.image_mode = args.image_size, args.image_mode
    config.stop_ids = [tok.im_end_id, tok.eos_id]
    config.text_vocab_size = tok.vocab_size
    if tok.vocab_size > llm.config.vocab_size:
        raise SystemExit(f"the tokenizer has {tok.vocab_size} pieces but the LLM's vocab_size is "
                         f"{llm.config.vocab_size}: ids past the embedding table would crash. Use a "
                         "tokenizer that fits or an LLM config with vocab_size >= the tokenizer's")
    return model


def main(stage: int = 1, argv=None) -> None:
    args = parse_args(stage, argv)
    out = Path(args.out)
    d = dist.setup(timeout_s=args.dist_timeout)
    hang.attach(d, out)              # heartbeats and stack dumps under OUT (kill -USR1 <pid> writes every rank's)
    try:
        doctor.quick_check(d)        # under torchrun: every rank joined, no shared GPU, a correct all-reduce
        run(args, out, d)
    finally:
        dist.teardown(d)


def run(args, out: Path, d: "dist.Dist") -> None:
    log, print0 = d.log, d.print0

    # ---- settings -------------------------------------------------------------------------------
    init = Path(args.init_from) if args.init_from else None
    said = inherit(args, init)
    if init:
        print0(f"stage {args.stage}: from {args.init_from}, inherited " + (", ".join(said) or "nothing"))
    if not args.tokenizer:
        raise SystemExit("give --tokenizer FILE (or --init-from a stage-1 folder, which holds one)")
    for part in ("llm", "vit"):
        if not (getattr(args, part) or getattr(args, f"{part}_config") or args.init_from):
            raise SystemExit(f"give --{part} DIR, --{part}-config NAME_OR_JSON, or --init-from DIR")
    try:
        parts = parse_parts(args.train)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.lora_r and "llm" not in parts:
        raise SystemExit("--lora-r trains the LLM through adapters: add llm to --train")
    if args.fsdp and args.zero:
        raise SystemExit("--fsdp shards the optimizer state already (and the parameters and gradients): drop --zero")
    device = d.device
    compute_dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    # ---- data: cheap checks on every rank, tokenization later, per sample, in loader workers ------
    # Before the model is loaded, so a bad sample is reported in seconds, not after minutes of loading.
    print0(f"reading data from {', '.join(map(str, args.data))}")
    tok = Tokenizer(args.tokenizer)
    # The checkpoint folder each part loads from; None = fresh weights from --llm-config / --vit-config.
    src = {part: Path(getattr(args, part)) if getattr(args, part) else (init / part if init else None)
           for part in PARTS}
    vit_cfg = vit_config(src["vit"] or args.vit_config)
    if args.image_size % vit_cfg.patch_size:
        raise SystemExit(f"--image-size {args.image_size} is not a multiple of the ViT patch size {vit_cfg.patch_size}")
    image_tokens = vit_cfg.image_tokens(args.image_size)     # LLM positions per image
    dataset = LLaVADataset(args.data, tok, args.image_folder, image_size=args.image_size, image_mode=args.image_mode,
                           max_length=args.max_length, image_tokens=image_tokens, system=args.system,
                           skip_bad=args.skip_bad_samples, max_images=args.max_images)
    print0(dataset.report())
    global_batch = args.batch_size * d.world_size * args.grad_accum     # samples, or packed rows with --pack
    if args.pack and args.pack < args.max_length:
        raise SystemExit(f"--pack {args.pack} is shorter than --max-length {args.max_length}: a sample cut at "
                         "--max-length must fit in one packed row; use --pack >= --max-length")
    sampler = GlobalBatchSampler(dataset.lengths, global_batch, seed=args.seed, pack=args.pack)
    if args.pack:
        print0(f"packing: {len(sampler.packs)} rows of <= {args.pack} positions per epoch (by the length estimates)")
    max_steps = args.max_steps or max(1, int(args.epochs * sampler.steps_per_epoch))

    # ---- model ----------------------------------------------------------------------------------
    sharded = args.fsdp and d.world_size > 1
    on = fsdp.load_device(d) if sharded else device      # under --fsdp only rank 0 reads the weights (on the CPU)
    with torch.device(on) if on.type == "meta" else contextlib.nullcontext():   # fresh parts built on meta too
        model = build_model(args, tok, src, parts, compute_dtype, on)
    model.requires_grad_(False)
    for name in parts:
        getattr(model, name).requires_grad_(True)
    if "vit" in parts:
        # Blocks after the selected layer and the final LayerNorm never reach the loss: freeze them, or DDP
        # waits forever for their gradients.
        for block in model.vit.encoder.layer[vit_cfg.blocks_run(model.config.select_layer):]:
            block.requires_grad_(False)
        model.vit.layernorm.requires_grad_(False)
    if args.lora_r:
        model.llm.requires_grad_(False)
        replaced = apply_lora(model.llm, r=args.lora_r, alpha=args.lora_alpha or 2 * args.lora_r,
                              dropout=args.lora_dropout)
        print0(f"LoRA r={args.lora_r} on {len(replaced)} linear layers of the LLM")
    if args.grad_checkpointing:
        model.set_gradient_checkpointing(True)
    # A part with any frozen tensor is rebuilt on resume: the checkpoint records from which source, or recipe.
    recipe = {"llm": args.llm_config, "vit": args.vit_config, "projector": "default"}
    frozen = {part: checkpoint.source_fingerprint(src[part]) if src[part] else
              {"fresh": {"config": str(recipe[part]), "seed": args.seed}}
              for part in PARTS if not all(p.requires_grad for p in getattr(model, part).parameters())}
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"parameters: {sum(p.numel() for p in model.parameters()):,} total, {n_train:,} trained "
           f"({', '.join(sorted(parts))}{', LoRA' if args.lora_r else ''})")

    if sharded:
        # Before the optimizer, which then holds fp32 state for this rank's shards only (llava_min/fsdp.py).
        with dist.collective(d, "FSDP set-up (device mesh)"):
            fsdp.shard(model, d, compute_dtype)
    elif args.fsdp:
        print0("--fsdp with one process: nothing to shard, training unsharded")

    # ---- optimiser ------------------------------------------------------------------------------
    groups = param_groups(model, args.lr, args.weight_decay, projector_lr=args.projector_lr)
    optimizer = make_optimizer(groups, args.lr, zero=args.zero and d.world_size > 1)
    schedule = CosineSchedule(optimizer, max_steps, args.warmup_ratio)   # warm-up then cosine, per group

    # ---- resume ---------------------------------------------------------------------------------
    start_step = 0
    if d.rank == 0:
        checkpoint.clean_leftovers(out)                       # half-written checkpoints of a killed run
    ckpt = checkpoint.latest_checkpoint(out)
    if ckpt is not None and not args.resume:
        raise SystemExit(f"{out} already holds checkpoints: pass --resume to continue that run, or choose "
                         "another --out")
    if args.resume and ckpt is None:
        print0(f"--resume: no complete checkpoint in {out}/checkpoints, starting from step 0")
    if ckpt is not None:
        state = checkpoint.load_training_state(ckpt, map_location=device)
        checkpoint.check_sources(state["frozen"], frozen, ckpt)      # the frozen weights are the same ones
        if "sharded" in state:                                       # saved under --fsdp: any world size, any mode
            if args.zero:
                raise SystemExit(f"{ckpt} was saved under --fsdp: resume with --fsdp, or without --zero")
            fsdp.load_sharded(model, optimizer, ckpt, d)
        elif fsdp.is_sharded(model):
            raise SystemExit(f"{ckpt} was saved without --fsdp: resume it without --fsdp (a checkpoint saved "
                             "with --fsdp resumes with or without it)")
        else:
            checkpoint.check_trained(set(state["trainable"]), model, ckpt)
            model.load_state_dict(state["trainable"], strict=False)     # the frozen tensors come from their sources
            optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng = state["rng"]   # one per rank; a different world size continues from rank 0's stream
        checkpoint.restore_rng_state(rng[d.rank] if d.rank < len(rng) else rng[0])
        start_step = state["step"]
        if state["args"].get("pack", 0) != args.pack:
            raise SystemExit(f"{ckpt}: saved with --pack {state['args'].get('pack', 0)}, now {args.pack}; "
                             "keep --pack to continue the same data order")
        if state.get("global_batch") != global_batch:
            raise SystemExit(f"{ckpt}: saved with global batch {state.get('global_batch')}, now {global_batch}; "
                             "keep batch x processes x accumulation equal to continue the same data order")
        print0(f"resumed from {ckpt} at step {start_step} (saved by {state.get('world_size')} processes, "
               f"now {d.world_size})")

    # All ranks must agree on what they are about to do (a mismatch hangs DDP later, loudly here).
    fingerprint = dist.config_hash({k: v for k, v in vars(args).items() if k != "resume"})
    dist.check_consistent(d, {"samples": len(dataset), "max_steps": max_steps, "start_step": start_step,
                              "trainable_params": n_train, "config_hash": fingerprint})
    # DDP's constructor is a collective (shapes compared, rank 0's weights broadcast). gradient_as_bucket_view:
    # gradients live in DDP's all-reduce buckets, not beside them (one copy of the trained parameters saved).
    # broadcast_buffers=False: the only buffer (the ViT's mask token) never changes; the default would broadcast
    # it in every forward, one more collective per step, outside any name.
    replicate = d.world_size > 1 and not fsdp.is_sharded(model)
    with dist.collective(d, "DDP set-up (parameter check and broadcast from rank 0)"):
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        gradient_as_bucket_view=True, broadcast_buffers=False) if replicate else model
    plan = memory.plan_from_args(args, world_size=d.world_size)
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    print0(memory.report(plan, gpu_gib))
    if d.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        metrics_file = out / "metrics.jsonl"
        if metrics_file.exists():   # a resumed run rewrites the steps after its checkpoint
            kept = [ln for ln in metrics_file.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
            metrics_file.write_text("".join(ln + "\n" for ln in kept))
        write_json(vars(args), out / "args.json")
        print0("configuration:\n" + "\n".join(f"  {k:18s} {v}" for k, v in sorted(vars(args).items())))

    # ---- the loop -------------------------------------------------------------------------------
    batches = sampler.batches_for_rank(d.rank, d.world_size, args.grad_accum, start_step, max_steps)
    shared = args.num_workers > 0    # workers collate straight into shared memory: handing a batch over copies nothing
    collate_fn = (functools.partial(collate_packed, capacity=args.pack, shared=shared, image_tokens=image_tokens)
                  if args.pack else functools.partial(collate, shared=shared))
    loader = Loader(dataset, batches, collate_fn, num_workers=args.num_workers, timeout=args.loader_timeout,
                    pin_memory=device.type == "cuda", seed=args.seed, first_batch=start_step * args.grad_accum)
    metrics = open(out / "metrics.jsonl", "a") if d.rank == 0 else None
    peak = flops.peak_flops(device)          # MFU on a known GPU: FLOPs counted as tools/flops.py says
    count_flops = flops.StepFlops(model, image_tokens) if peak else None
    bar = tqdm(total=max_steps, initial=start_step, desc="train", dynamic_ncols=True, mininterval=1.0,
               disable=d.rank != 0)
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    batch_iter = iter(loader)
    ddp_model.train()
    try:
        for step in range(start_step, max_steps):
            t0 = time.time()
            d.heartbeat(step + 1, "waiting for data")
            micro = [next(batch_iter) for _ in range(args.grad_accum)]
            loss, seen, positions, step_flops = forward_backward(ddp_model, micro, autocast, device, d, step,
                                                                 count_flops)
            if not math.isfinite(loss):        # every rank sees the same all-reduced loss: all act alike
                ids = [i for b in micro for i in b["ids"]]
                msg = (f"step {step + 1}: loss is {loss} (NaN/inf). Samples of this rank's batches: {ids[:32]}. "
                       "Try a lower --lr or --dtype float32")
                if args.nan == "stop":
                    raise FloatingPointError(msg + ", or --nan skip to skip such steps")
                log(msg + " -- skipping this step")
                optimizer.zero_grad(set_to_none=True)
            else:
                lr = schedule.lr
                grad_norm = (fsdp.clip_gradients(model, args.clip, d, step + 1) if fsdp.is_sharded(model)
                             else clip_gradients(model.parameters(), args.clip))
                # Under ZeRO each rank updates its shard and broadcasts it: a collective, named if it times out.
                with (dist.collective(d, f"optimizer step {step + 1} (ZeRO shard broadcast)") if args.zero
                      else contextlib.nullcontext()):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                dt = time.time() - t0
                record = {"step": step + 1, "loss": round(loss, 6), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                          "tokens_per_s": round(seen / dt, 1), "padding": round(1 - seen / positions, 4),
                          "seconds": round(dt, 3)}
                if peak:
                    record["mfu"] = round(step_flops / (dt * d.world_size * peak), 4)
                if device.type == "cuda":
                    record["max_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                pad=f"{record['padding']:.1%}")
            bar.update(1)
            d.heartbeat(step + 1, "step done")
            last = step + 1 == max_steps
            if (step + 1) % args.save_every == 0 or last:
                save(model, tok, optimizer, schedule, args, out, step + 1, global_batch, d, src, frozen, final=last)
    except torch.cuda.OutOfMemoryError:
        # Say what would fit before the traceback: the estimate and the flags that change it.
        log("CUDA out of memory. " + memory.report(plan, gpu_gib) + "\nflags that would fit: "
            + " ".join(memory.suggest_fit(plan, gpu_gib or 0.0)))
        raise
    finally:
        loader.close()
        bar.close()
        if metrics:
            metrics.close()
    print0(f"done: {max_steps} steps; model in {out}")


def forward_backward(ddp_model, micro: list[dict], autocast, device, d, step: int,
                     count_flops=None) -> tuple[float, int, int, float]:
    """Forward and backward over one optimizer step's micro-batches; returns the global mean loss, the number of
    real LLM positions the whole job processed, that number with the padding, and the FLOPs (count_flops).
    The loss is normalised by the supervised-token count of the whole global batch (all ranks, all micro-batches),
    so any split of it over processes and accumulation gives the same loss and gradients."""
    # The positions the model trains on (llava.trained_positions: the splice leaves their count unchanged).
    local_tokens = sum(int(trained_positions(b["labels"], b["attention_mask"]).sum()) for b in micro)
    counts = torch.tensor([float(local_tokens)], device=device)
    dist.all_reduce(d, counts, what=f"supervised-token count at step {step + 1}")
    global_tokens = max(counts.item(), 1.0)
    stats = torch.zeros(4, device=device, dtype=torch.float64)   # loss sum, real positions, all positions, FLOPs
    sharded = fsdp.is_sharded(ddp_model)
    for m, batch in enumerate(micro):
        last = m == len(micro) - 1
        where = f"{m + 1}/{len(micro)} at step {step + 1}"
        # Gradients are all-reduced only on the last micro-batch (DDP's no_sync on the others); FSDP keeps them
        # unsharded and reduce-scatters them once, likewise. FSDP also all-gathers each layer in forward and
        # backward: both run inside one named collective.
        sync = contextlib.nullcontext() if last or not isinstance(ddp_model, DDP) else ddp_model.no_sync()
        if sharded:
            ddp_model.set_requires_gradient_sync(last)
            sync = dist.collective(d, f"forward/backward (FSDP all-gather / reduce-scatter) {where}")
        d.heartbeat(step + 1, f"forward {m + 1}/{len(micro)}")
        with sync:
            with autocast:
                pixels = batch["pixel_values"]
                o = ddp_model(batch["input_ids"].to(device, non_blocking=True),
                              None if pixels is None else pixels.to(device, non_blocking=True),
                              labels=batch["labels"].to(device, non_blocking=True),
                              attention_mask=batch["attention_mask"].to(device, non_blocking=True))
            # DDP and FSDP average gradients over ranks; multiplying by world_size makes it the global-batch sum.
            with (contextlib.nullcontext() if sharded else
                  dist.collective(d, f"backward (DDP gradient all-reduce) {where}")):
                (o.loss_sum * (d.world_size / global_tokens)).backward()
        stats[0] += o.loss_sum.detach()
        stats[1] += (o.attention_mask > 0).sum()     # packed rows number their samples 1, 2, ...
        stats[2] += o.attention_mask.numel()
        stats[3] += count_flops(o, 0 if pixels is None else pixels.shape[0]) if count_flops else 0.0
    dist.all_reduce(d, stats, what=f"loss sum at step {step + 1}")
    return stats[0].item() / global_tokens, int(stats[1]), int(stats[2]), float(stats[3])


def save(model: LLaVA, tok: Tokenizer, optimizer, schedule, args, out: Path, step: int, global_batch: int, d,
         src: dict, frozen: dict, final: bool) -> None:
    """A checkpoint of what resume needs (atomic) and, at the end, the model itself in OUT. The barrier's timeout
    adds what a slow disk needs for rank 0's bytes: a long save cannot trip --dist-timeout."""
    sharded = fsdp.is_sharded(model)
    with dist.collective(d, f"gathering the ZeRO optimizer shards on rank 0 for the checkpoint at step {step}"):
        optimizer_state = None if sharded else gather_optimizer_state(optimizer)   # collective under ZeRO
    rng = dist.all_gather_object(d, checkpoint.capture_rng_state(), what=f"RNG states for checkpoint {step}")
    what = f"{out}/{checkpoint.CHECKPOINTS}/{checkpoint.step_name(step)}{f' and the model in {out}' if final else ''}"
    t0 = time.time()
    # Trained tensors in full precision (LoRA adapters unmerged) make resume bit-identical. Frozen tensors
    # are not saved: `frozen` names their sources, and resume checks that they are unchanged.
    state = {"schedule": schedule.state_dict(), "step": step, "rng": rng, "frozen": frozen,
             "global_batch": global_batch, "world_size": d.world_size, "args": vars(args)}
    if sharded:   # every rank writes its shards of the trained tensors and AdamW state; whole parts at the end
        fsdp.save_sharded(model, optimizer, out, step, state, keep=args.keep, d=d)
        output = fsdp.consolidated(model, _rewritten(model, src), d) if final else None
    if d.rank == 0:
        if not sharded:
            state.update(optimizer=optimizer_state,
                         trainable={n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad})
            checkpoint.save_checkpoint(out, step, state, keep=args.keep)
        plot_loss(out / "metrics.jsonl", out / "loss.png")
        if final:
            write_output(output if sharded else model, tok, args, out, src)
        d.log(f"saved {what} in {time.time() - t0:.1f} s")
    # Bytes rank 0 writes: fp32 trained weights and AdamW's two moments; at the end the parts it writes or copies.
    size = 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    if final:
        copied = PARTS if args.save_frozen == "copy" else _rewritten(model, src)
        size += sum(4 * p.numel() for part in copied for p in getattr(model, part).parameters())
    dist.barrier(d, what=f"rank 0's save of {what}", timeout_s=d.timeout_s + size / SLOW_DISK_BYTES_PER_S)


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _rewritten(model: LLaVA, src: dict) -> set[str]:
    """The parts the output writes: trained ones, and frozen ones without a source; the rest are linked."""
    return {part for part in PARTS if src[part] is None or _trains(getattr(model, part))}


def write_output(model: LLaVA, tok: Tokenizer, args, out: Path, src: dict) -> None:
    """OUT/llm (InternLM2), OUT/vit (DINOv2), OUT/projector (XTuner), tokenizer.model, llava_config.json. A frozen
    part with a source is linked, copied or referenced (--save-frozen); save_pretrained folds LoRA adapters in."""
    rewritten = _rewritten(model, src)
    for part in PARTS:
        module = getattr(model, part)
        if part not in rewritten:
            how = checkpoint.publish_frozen(src[part], out / part, args.save_frozen)
            print(f"{part}: {how} {src[part]}", flush=True)
            continue
        if not _trains(module):
            dtype = None                   # frozen and freshly initialised: written as it was used
        elif args.save_dtype == "source":
            dtype = checkpoint.stored_dtype(src[part]) if src[part] else torch.float32
        else:
            dtype = getattr(torch, args.save_dtype)
        module.save_pretrained(out / part, dtype=dtype)
    write_atomic(out / "tokenizer.model", Path(tok.path).read_bytes())
    write_json(asdict(model.config), out / CONFIG_FILE)


if __name__ == "__main__":
    main(stage=1)
