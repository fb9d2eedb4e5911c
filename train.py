"""Stage 1 of LLaVA training: align the projector on image captions (LLM and ViT frozen).

One process:
    python train.py --data data/shapes/pretrain.json --image-folder data/shapes \\
        --tokenizer data/shapes/tok.model --llm-config tiny --vit-config tiny --out out/stage1
Several GPUs / nodes (every rank reads and tokenizes its own samples lazily, nothing up front):
    torchrun --nproc_per_node 4 train.py --data blip_laion_cc_sbu_558k.json \\
        --image-folder LLaVA-Pretrain/images --tokenizer internlm2/tokenizer.model \\
        --llm internlm2-chat-7b --vit dinov2-large --out out/pretrain

finetune.py (stage 2) runs this same script with its own defaults (`main(stage=2)`). Read it top
to bottom: the arguments, then `run`, whose lines are the table of contents: settings, data, model,
parallelism, optimiser, resume, the loop (one step: `forward_backward`, then `optimizer_step`), and
saving (`save`).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from llava_min import checkpoint, dist, fsdp, heldout, parallel, preflight, stop
from llava_min.data import LLaVADataset, collate, collate_packed
from llava_min.internlm2 import InternLM2, load_config as llm_config
from llava_min.image import check_image_size
from llava_min.llava import CONFIG_FILE, PARTS, LLaVA, LLaVAConfig, parse_parts, trained_positions
from llava_min.llava import vision_config, vision_tower
from llava_min.loader import Loader
from llava_min.lora import ALPHA_PER_RANK, apply_lora
from llava_min.optim import CosineSchedule, param_groups
from llava_min.plot import plot_loss
from llava_min.projector import Projector
from llava_min.sampler import GlobalBatchSampler
from llava_min.tokenizer import Tokenizer
from llava_min.tools import doctor, flops, hang, memory
from llava_min.weights import write_atomic, write_json

# Per-stage defaults (LLaVA-1.5 scripts/v1_5 and XTuner's internlm2_chat LLaVA configs).
STAGE_DEFAULTS = {1: dict(train="projector", lr=1e-3, batch_size=32),
                  2: dict(train="projector,llm", lr=2e-5, batch_size=16)}
# Settings a stage-2 run takes from its --init-from folder. Their flags default to None ("not
# given"), so a flag typed on the command line, abbreviated or not, always wins; without
# --init-from these defaults apply.
INHERITED = {"tokenizer": None, "image_size": 336, "image_mode": "pad", "max_length": 2048,
             "system": None}
# What a busy shared file system still writes: sizes the wait for rank 0's saves.
SLOW_DISK_BYTES_PER_S = 20e6


# Arguments

def parse_args(stage: int, argv=None) -> argparse.Namespace:
    description = __doc__
    if stage != 1:
        description = sys.modules["__main__"].__doc__
    # A mistyped flag is named with the closest real one; --help shows every default
    # (llava_min/preflight.py).
    p = preflight.ArgumentParser(description=description)
    _what_to_train(p, STAGE_DEFAULTS[stage])
    _how_to_train(p, STAGE_DEFAULTS[stage])
    _how_to_run(p)
    args = p.parse_args(argv)
    args.stage = stage
    return args


def _what_to_train(p: argparse.ArgumentParser, defaults: dict) -> None:
    """The data and the parts of the model."""
    p.add_argument("--data", nargs="+", required=True,
                   help="LLaVA-format JSON (a list) or JSONL files")
    p.add_argument("--image-folder", default=".",
                   help="image paths in the data are relative to it")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece model (inherited with --init-from)")
    p.add_argument("--llm", default=None, help="pretrained InternLM2 folder")
    p.add_argument("--llm-config", default=None,
                   help="fresh weights: preset (tiny, internlm2-1_8b, internlm2-7b) "
                        "or config.json")
    p.add_argument("--vit", default=None,
                   help="pretrained vision tower folder (DINOv2, CLIP or SigLIP, by model_type)")
    p.add_argument("--vit-config", default=None,
                   help="fresh weights: preset (tiny, dinov2-small/-base/-large/-giant[-reg], "
                        "tiny-clip, clip-vit-large-patch14-336, tiny-siglip, "
                        "siglip-so400m-patch14-384, siglip-base-patch16-224) or config.json")
    p.add_argument("--projector", default=None,
                   help="pretrained projector folder (XTuner or HF LLaVA names)")
    p.add_argument("--init-from", default=None,
                   help="a folder written by train.py (stage 1 output)")
    p.add_argument("--train", default=defaults["train"],
                   help="comma list of projector,llm,vit, or all")
    p.add_argument("--lora-r", type=int, default=0,
                   help="train the LLM through LoRA adapters of this rank")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help=f"LoRA scale numerator (default {ALPHA_PER_RANK} * r)")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--max-length", type=int, default=None,
                   help="cap on the LLM's sequence (default 2048; inherited)")
    p.add_argument("--image-size", type=int, default=None,
                   help="square ViT input (default 336; inherited)")
    p.add_argument("--image-mode", choices=["pad", "crop"], default=None,
                   help="pad to square (LLaVA-1.5, the default) or centre crop; inherited")
    p.add_argument("--system", default=None, help="system prompt for every sample (inherited)")
    p.add_argument("--skip-bad-samples", action="store_true",
                   help="drop (and count) bad samples instead of stopping")


def _how_to_train(p: argparse.ArgumentParser, defaults: dict) -> None:
    """Length, batch, optimiser, precision."""
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="drop (and count) samples with more than N images (default: no limit)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="length in optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=defaults["batch_size"],
                   help="micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=defaults["lr"],
                   help="peak learning rate (warm-up then cosine)")
    p.add_argument("--projector-lr", type=float, default=None,
                   help="separate peak lr for the projector")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
    p.add_argument("--nan", choices=["stop", "skip"], default="stop",
                   help="on a NaN/inf loss or gradient norm: stop, or skip the step")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default bfloat16 on CUDA, float32 on CPU); "
                        "trained weights stay fp32")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in backward")
    p.add_argument("--pack", type=int, default=0, metavar="N",
                   help="pack whole samples into rows of at most N LLM positions "
                        "(N >= --max-length), attention isolated per sample; --batch-size counts rows")
    p.add_argument("--seed", type=int, default=0)


def _how_to_run(p: argparse.ArgumentParser) -> None:
    """Output, checkpoints, processes."""
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--save-every", type=int, default=500,
                   help="checkpoint every N optimizer steps")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept in OUT/checkpoints")
    p.add_argument("--save-frozen", choices=["link", "copy", "ref"], default="link",
                   help="frozen parts in OUT: hard links to the source files (else copies), "
                        "copies, or a symbolic link to the source folder")
    p.add_argument("--save-dtype", choices=["source", "float32", "bfloat16"], default="source",
                   help="dtype of the trained parts in OUT (default: their source checkpoint's; "
                        "fp32 if fresh)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest complete checkpoint in --out")
    p.add_argument("--num-workers", type=int, default=4,
                   help="loader worker processes; 0 = in the main process")
    p.add_argument("--loader-timeout", type=float, default=600,
                   help="seconds a loader worker may be silent")
    p.add_argument("--dist-timeout", type=float, default=600,
                   help="timeout (s) of every collective")
    p.add_argument("--zero", action="store_true",
                   help="shard optimizer state across ranks (ZeRO-1)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state across ranks "
                        "(FSDP2 fully_shard, ZeRO-3's layout) instead of replicating them (DDP)")
    p.add_argument("--stop-grace", type=float, default=30,
                   help="seconds between SIGTERM and SIGKILL the run can count on to finish its step "
                        "and save (torchrun's --shutdown-timeout, SLURM's KillWait)")
    p.add_argument("--new-tokenizer", action="store_true",
                   help="allow a --tokenizer other than --init-from's")
    p.add_argument("--eval-data", default=None,
                   help="held-out LLaVA-format file: its loss as eval_loss")
    p.add_argument("--eval-every", type=int, default=None,
                   help="held-out loss every N steps (default: --save-every)")


def inherit(args, init_dir: Path | None) -> list[str]:
    """Fill the INHERITED settings left at None: from the stage-1 folder's args.json, else the
    defaults."""
    saved = {}
    if init_dir and (init_dir / "args.json").exists():
        saved = json.loads((init_dir / "args.json").read_text())
    if init_dir:
        saved["tokenizer"] = str(init_dir / "tokenizer.model")
    said = []
    for key, default in INHERITED.items():
        if getattr(args, key) is not None:
            continue
        value = saved.get(key)
        if value is None:
            value = default
        else:
            said.append(f"{key}={value}")
        setattr(args, key, value)
    return said


# The run, stage by stage

def main(stage: int = 1, argv=None) -> None:
    args = parse_args(stage, argv)
    # Every path and flag combination, before any data is read: one message and exit 2 if wrong.
    preflight.check(args, INHERITED)
    out = Path(args.out)
    d = dist.setup(timeout_s=args.dist_timeout)
    # SIGTERM / SIGINT / SIGUSR1: finish the step, save, exit (llava_min/stop.py).
    stop.install(d, args.stop_grace)
    # Heartbeats and stack dumps under OUT (kill -USR2 <pid> writes every rank's).
    hang.attach(d, out)
    try:
        # Under torchrun: every rank joined, no shared GPU, a correct all-reduce.
        doctor.quick_check(d)
        run(args, out, d)
    finally:
        dist.teardown(d)


def run(args, out: Path, d: "dist.Dist") -> None:
    """The whole training run: each line below is one stage, a function of this file, in order."""
    # Settings: what --init-from hands on; flag combinations refused before anything is loaded.
    parts, compute_dtype = settings(args, d)
    # Data: cheap checks of every sample on every rank now, so a bad one is reported in seconds;
    # tokenization later, per sample, in the loader's workers.
    data = load_data(args, d)
    # Model: each part read once, in its final dtype; frozen where it does not train; LoRA.
    model, frozen = prepare_model(args, data, parts, compute_dtype, d)
    # Parallelism: one process, DDP, DDP + ZeRO-1 or FSDP2, behind one object (parallel.py).
    par = parallel.Parallel(model, d, want_fsdp=args.fsdp, want_zero=args.zero,
                            compute_dtype=compute_dtype)
    # Optimiser: AdamW over the trained tensors; the learning rate warmed up, then cosine-decayed.
    schedule = make_optimiser(args, par, data.max_steps)
    # Resume: the latest complete checkpoint in OUT, when --resume asks for it.
    start_step = resume(args, out, par, schedule, frozen, data, d)
    # The loop: per step, forward and backward over its micro-batches, one update; saves between.
    train_loop(args, out, par, schedule, frozen, data, start_step, compute_dtype, d)
    d.print0(f"done: {data.max_steps} steps; model in {out}")


def settings(args, d: "dist.Dist") -> tuple[set[str], torch.dtype]:
    """Fill the inherited settings, refuse contradictory flags; returns the trained parts and
    compute dtype."""
    init = None
    if args.init_from:
        init = Path(args.init_from)
    said = inherit(args, init)
    if init:
        listed = ", ".join(said) or "nothing"
        d.print0(f"stage {args.stage}: from {args.init_from}, inherited {listed}")
        d.print0(preflight.changes(args, init, INHERITED))
    # Contradictory flags were refused before this (preflight.check); this one the run needs.
    parts = parse_parts(args.train)
    if args.fsdp and d.world_size == 1:
        d.print0("--fsdp with one process: nothing to shard, training unsharded")
    # bfloat16 on a GPU, float32 on the CPU, unless --dtype says.
    dtype_name = args.dtype
    if dtype_name is None:
        dtype_name = "float32"
        if d.device.type == "cuda":
            dtype_name = "bfloat16"
    return parts, getattr(torch, dtype_name)


@dataclass
class Data:
    """What the data stage hands on: the samples, their order, and the sizes that follow from
    them."""
    tok: Tokenizer
    src: dict                  # part -> the checkpoint folder it loads from; None = fresh weights
    vit_config: object         # the ViT's config: patch size, blocks run for the feature layer
    image_tokens: int          # LLM positions per image
    dataset: LLaVADataset
    sampler: GlobalBatchSampler
    global_batch: int          # samples (or packed rows) per optimizer step, all ranks together
    max_steps: int
    held_out: heldout.HeldOut | None   # --eval-data: the held-out set in its fixed order; None without


def load_data(args, d: "dist.Dist") -> Data:
    """The samples checked and measured (not tokenized), the global batch order, and the run's
    length."""
    d.print0(f"reading data from {', '.join(map(str, args.data))}")
    tok = Tokenizer(args.tokenizer)
    # The checkpoint folder each part loads from; None = fresh weights from --llm-config /
    # --vit-config.
    src = {}
    for part in PARTS:
        src[part] = None
        if getattr(args, part):
            src[part] = Path(getattr(args, part))
        elif args.init_from:
            src[part] = Path(args.init_from) / part
    vit_cfg = vision_config(src["vit"] or args.vit_config)
    try:
        check_image_size(args.image_size, args.image_size, vit_cfg.patch_size)
    except ValueError as e:
        raise SystemExit(f"--image-size: {e}") from None
    image_tokens = vit_cfg.image_tokens(args.image_size)
    dataset = LLaVADataset(args.data, tok, args.image_folder, image_size=args.image_size,
                           image_mode=args.image_mode, max_length=args.max_length,
                           image_tokens=image_tokens, system=args.system,
                           skip_bad=args.skip_bad_samples, max_images=args.max_images,
                           preprocessing=vit_cfg.preprocessing, decode_errors="mark")
    d.print0(dataset.report())
    global_batch = args.batch_size * d.world_size * args.grad_accum
    sampler = GlobalBatchSampler(dataset.lengths, global_batch, seed=args.seed, pack=args.pack)
    if args.pack:
        d.print0(f"packing: {len(sampler.packs)} rows of <= {args.pack} positions per epoch "
                 "(by the length estimates)")
    max_steps = args.max_steps or max(1, int(args.epochs * sampler.steps_per_epoch))
    held_out = heldout.from_args(args, tok, image_tokens, vit_cfg.preprocessing, d)
    return Data(tok, src, vit_cfg, image_tokens, dataset, sampler, global_batch, max_steps, held_out)


def prepare_model(args, data: Data, parts: set[str], compute_dtype: torch.dtype,
                  d: "dist.Dist") -> tuple[LLaVA, dict]:
    """The model on this rank's device (under --fsdp: rank 0's on the CPU, the others' on meta),
    frozen where it does not train; returns it and the `frozen` record a checkpoint keeps of the
    frozen parts' sources."""
    on = d.device
    if args.fsdp and d.world_size > 1:
        # Under --fsdp only rank 0 reads the weights (on the CPU), the others build on meta.
        on = fsdp.load_device(d)
    # On meta, the fresh parts are built there too (no storage).
    where = contextlib.nullcontext()
    if on.type == "meta":
        where = torch.device("meta")
    with where:
        model = build_model(args, data.tok, data.src, parts, compute_dtype, on)
    model.requires_grad_(False)
    for name in parts:
        getattr(model, name).requires_grad_(True)
    if "vit" in parts:
        # Blocks after the selected layer and the final norm never reach the loss: freeze them,
        # or DDP waits forever for their gradients.
        model.vit.freeze_unused(model.config.select_layer)
    if args.lora_r:
        model.llm.requires_grad_(False)
        replaced = apply_lora(model.llm, r=args.lora_r, alpha=args.lora_alpha,
                              dropout=args.lora_dropout)
        d.print0(f"LoRA r={args.lora_r} on {len(replaced)} linear layers of the LLM")
    if args.grad_checkpointing:
        model.set_gradient_checkpointing(True)
    frozen = frozen_sources(args, model, data.src)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = ""
    if args.lora_r:
        lora = ", LoRA"
    n_all = sum(p.numel() for p in model.parameters())
    d.print0(f"parameters: {n_all:,} total, {n_train:,} trained ({', '.join(sorted(parts))}{lora})")
    # All ranks must agree on what they are about to do: a mismatch would hang DDP later; it is
    # loud here.
    fingerprint = dist.config_hash({k: v for k, v in vars(args).items() if k != "resume"})
    dist.check_consistent(d, {"samples": len(data.dataset), "max_steps": data.max_steps,
                              "trainable_params": n_train, "config_hash": fingerprint})
    return model, frozen


def frozen_sources(args, model: LLaVA, src: dict) -> dict:
    """A part with any frozen tensor is rebuilt on resume: the checkpoint records from which
    source (its fingerprint) or which recipe (config and seed), and resume checks it is the
    same."""
    recipe = {"llm": args.llm_config, "vit": args.vit_config, "projector": "default"}
    frozen = {}
    for part in PARTS:
        if all(p.requires_grad for p in getattr(model, part).parameters()):
            continue
        if src[part]:
            frozen[part] = checkpoint.source_fingerprint(src[part])
        else:
            frozen[part] = {"fresh": {"config": str(recipe[part]), "seed": args.seed}}
    return frozen


def build_model(args, tok: Tokenizer, src: dict, parts: set[str], dtype: torch.dtype, device) -> LLaVA:
    """Each part read once, straight to the device, in its final dtype: fp32 for what trains
    (the optimizer's master weights), the compute dtype for what stays frozen (the LLM under
    LoRA included)."""
    def dtype_of(part: str) -> torch.dtype:
        if part in parts and not (part == "llm" and args.lora_r):
            return torch.float32
        return dtype

    torch.manual_seed(args.seed)  # fresh weights identical on every rank and on resume
    if src["llm"]:
        llm = InternLM2.from_pretrained(src["llm"], dtype=dtype_of("llm"), device=device)
    else:
        llm = InternLM2(llm_config(args.llm_config)).to(device, dtype_of("llm"))
    # DINOv2, CLIP or SigLIP, by config.json's model_type (or the preset's).
    tower = vision_tower(src["vit"] or args.vit_config)
    if src["vit"]:
        vit = tower.from_pretrained(src["vit"], dtype=dtype_of("vit"), device=device)
    else:
        vit = tower(vision_config(args.vit_config)).to(device, dtype_of("vit"))
    if src["projector"]:
        projector = Projector.from_pretrained(src["projector"], dtype=dtype_of("projector"),
                                              device=device)
    else:
        projector = Projector(vit.config.hidden_size, llm.config.hidden_size)
        projector = projector.to(device, dtype_of("projector"))
    config = LLaVAConfig()
    if args.init_from:
        config = LLaVAConfig.read(args.init_from)
    model = LLaVA(llm, vit, projector, config)
    config.image_size = args.image_size
    config.image_mode = args.image_mode
    config.stop_ids = [tok.im_end_id, tok.eos_id]
    config.text_vocab_size = tok.vocab_size
    if tok.vocab_size > llm.config.vocab_size:
        raise SystemExit(f"the tokenizer has {tok.vocab_size} pieces but the LLM's vocab_size is "
                         f"{llm.config.vocab_size}: ids past the embedding table would crash. Use a "
                         "tokenizer that fits or an LLM config with vocab_size >= the tokenizer's")
    return model


def make_optimiser(args, par: "parallel.Parallel", max_steps: int) -> CosineSchedule:
    """AdamW (held by `par`: its state sharded under ZeRO-1 / FSDP) and its warm-up + cosine
    schedule."""
    groups = param_groups(par.model, args.lr, args.weight_decay, projector_lr=args.projector_lr)
    optimizer = par.make_optimizer(groups, args.lr)
    # Warm-up then cosine, per group; the learning rate is a function of the step alone.
    return CosineSchedule(optimizer, max_steps, args.warmup_ratio)


def resume(args, out: Path, par: "parallel.Parallel", schedule: CosineSchedule, frozen: dict,
           data: Data, d: "dist.Dist") -> int:
    """The step to start from: 0, or (--resume) that of the latest complete checkpoint in OUT,
    after loading its trained tensors, optimizer and schedule state and this rank's RNG states."""
    if d.rank == 0:
        # Half-written checkpoints of a killed run.
        checkpoint.clean_leftovers(out)
    ckpt = checkpoint.latest_checkpoint(out)
    if ckpt is not None and not args.resume:
        raise SystemExit(f"{out} already holds checkpoints: pass --resume to continue that run, "
                         "or choose another --out")
    start_step = 0
    if ckpt is None and args.resume:
        d.print0(f"--resume: no complete checkpoint in {out}/checkpoints, starting from step 0")
    if ckpt is not None:
        state = checkpoint.load_training_state(ckpt, map_location=d.device)
        check_same_run(state, args, data, ckpt)
        # The frozen weights are the same ones.
        checkpoint.check_sources(state["frozen"], frozen, ckpt)
        par.load_checkpoint(ckpt, state)
        schedule.load_state_dict(state["schedule"])
        # One RNG state per rank; on another world size the new ranks continue from rank 0's
        # stream.
        rng = state["rng"]
        mine = rng[0]
        if d.rank < len(rng):
            mine = rng[d.rank]
        checkpoint.restore_rng_state(mine)
        start_step = state["step"]
        d.print0(f"resumed from {ckpt} at step {start_step} (saved by {state.get('world_size')} "
                 f"processes, now {d.world_size})")
    # Every rank must start at the same step (each found the same checkpoint).
    dist.check_consistent(d, {"start_step": start_step})
    return start_step


def check_same_run(state: dict, args, data: Data, ckpt: Path) -> None:
    """Refuse a resume that would not continue the same data order."""
    saved_pack = state["args"].get("pack", 0)
    if saved_pack != args.pack:
        raise SystemExit(f"{ckpt}: saved with --pack {saved_pack}, now {args.pack}; keep --pack "
                         "to continue the same data order")
    if state.get("global_batch") != data.global_batch:
        raise SystemExit(f"{ckpt}: saved with global batch {state.get('global_batch')}, now "
                         f"{data.global_batch}; keep batch x processes x accumulation equal to "
                         "continue the same data order")


# The loop

def train_loop(args, out: Path, par: "parallel.Parallel", schedule: CosineSchedule, frozen: dict,
               data: Data, start_step: int, compute_dtype: torch.dtype, d: "dist.Dist") -> None:
    """Steps start_step + 1 .. max_steps, each: the micro-batches' forward and backward, one
    update (or a skip, --nan), a metrics line; between two steps the checkpoints."""
    device = d.device
    plan, gpu_gib = memory_estimate(args, data, d)
    metrics = open_metrics(args, out, start_step, d)
    # Samples dropped so far because an image did not decode (metrics.jsonl's running total).
    bad_total = last_record(out, d).get("bad_samples_total", 0)
    loader = make_loader(args, data, start_step, d)
    # MFU on a known GPU: FLOPs counted as tools/flops.py says.
    peak = flops.peak_flops(device, compute_dtype)
    count_flops = None
    if peak:
        count_flops = flops.StepFlops(par.model, data.image_tokens)
    bar = tqdm(total=data.max_steps, initial=start_step, desc="train", dynamic_ncols=True,
               mininterval=1.0, disable=d.rank != 0)
    autocast = torch.autocast(device.type, dtype=compute_dtype,
                              enabled=compute_dtype != torch.float32)
    batches = iter(loader)
    par.module.train()
    # From here a signal means: finish the step, save, stop.
    stop.arm()
    try:
        for step in range(start_step, data.max_steps):
            t0 = time.time()
            d.heartbeat(step + 1, "waiting for data")
            micro = [next(batches) for _ in range(args.grad_accum)]
            sums = forward_backward(par, micro, autocast, device, d, step, count_flops,
                                    skip_bad=args.skip_bad_samples)
            lr = schedule.lr
            grad_norm = optimizer_step(par, schedule, args, sums["loss"], micro, step, d)
            last = step + 1 == data.max_steps
            eval_loss = held_out_loss(args, data, par, autocast, step + 1, last)
            bad_total += len(sums["bad"])
            if grad_norm is not None:
                record = step_record(step, sums, lr, grad_norm, time.time() - t0, peak, d)
                record["bad_samples_total"] = bad_total
                if eval_loss is not None:
                    record["eval_loss"] = eval_loss
                write_record(record, metrics, bar)
            if eval_loss is not None:
                bar.set_description(f"train (eval_loss {eval_loss:.4f} at step {step + 1})")
            bar.update(1)
            d.heartbeat(step + 1, "step done")
            # Between two steps: a checkpoint every --save-every steps, at the end, and when a signal
            # reached any rank (every rank agrees here, then all save together and stop).
            stopping = stop.agreed(step + 1) and not last
            if (step + 1) % args.save_every == 0 or last or stopping:
                save(par, schedule, args, out, step + 1, data, frozen, d, final=last)
            if stopping:
                # The step, the checkpoint and the command to continue; exit 143 / 130 / 138.
                stop.finish(step + 1, out)
        if bad_total:
            d.print0(f"bad images: {bad_total} samples left out of the loss, their image did not "
                     f"decode (named above and in {out}/metrics.jsonl)")
    except BadImageStop as e:
        # Every rank is here, after the same step: save it (unless saved), say how to go on, exit 3.
        if e.finished > start_step and e.finished % args.save_every:
            save(par, schedule, args, out, e.finished, data, frozen, d, final=False)
        # The message below the progress bar, not inside it.
        bar.close()
        d.print0(bad_image_stop_message(args, out, e.finished, start_step))
        raise SystemExit(BAD_IMAGE_EXIT) from None
    except torch.cuda.OutOfMemoryError:
        # Say what would fit before the traceback: the estimate and the flags that change it.
        d.log("CUDA out of memory. " + memory.report(plan, gpu_gib) + "\nflags that would fit: "
              + " ".join(memory.suggest_fit(plan, gpu_gib or 0.0)))
        raise
    finally:
        loader.close()
        bar.close()
        if metrics:
            metrics.close()


def memory_estimate(args, data: Data, d: "dist.Dist"):
    """The memory tool's plan for this run and the GPU's GiB (None on the CPU), its report printed
    before the first step."""
    plan = memory.plan_from_args(args, world_size=d.world_size)
    # Every image of a sample takes ViT and projector memory: book the most any sample holds (a
    # packed row is booked with as many images as fit in it already).
    if not args.pack:
        plan = plan.replace(images_per_sample=max(1, data.dataset.stats["most_images"]))
    gpu_gib = None
    if d.device.type == "cuda":
        gpu_gib = torch.cuda.get_device_properties(d.device).total_memory / 2**30
    d.print0(memory.report(plan, gpu_gib))
    return plan, gpu_gib


def held_out_loss(args, data: Data, par: "parallel.Parallel", autocast, step: int,
                  last: bool) -> float | None:
    """The --eval-data loss every --eval-every steps (default --save-every) and at the end; None
    between those steps or without --eval-data."""
    if data.held_out is None:
        return None
    every = args.eval_every or args.save_every
    if step % every and not last:
        return None
    return round(data.held_out.loss(par.model, autocast, step), 6)


def last_record(out: Path, d: "dist.Dist") -> dict:
    """Rank 0: the last line of OUT/metrics.jsonl (open_metrics kept those up to the start step),
    or {}. Other ranks: {}."""
    metrics_file = out / "metrics.jsonl"
    if d.rank != 0 or not metrics_file.exists():
        return {}
    lines = metrics_file.read_text().splitlines()
    if not lines:
        return {}
    return json.loads(lines[-1])


def open_metrics(args, out: Path, start_step: int, d: "dist.Dist"):
    """Rank 0: OUT/args.json, the configuration printed, and OUT/metrics.jsonl open for
    appending (a resumed run first drops the lines after its checkpoint). Other ranks: None."""
    if d.rank != 0:
        return None
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = out / "metrics.jsonl"
    if metrics_file.exists():
        lines = metrics_file.read_text().splitlines()
        kept = [line for line in lines if line and json.loads(line)["step"] <= start_step]
        metrics_file.write_text("".join(line + "\n" for line in kept))
    write_json(vars(args), out / "args.json")
    listed = "\n".join(f"  {k:18s} {v}" for k, v in sorted(vars(args).items()))
    print("configuration:\n" + listed, flush=True)
    return open(metrics_file, "a")


def make_loader(args, data: Data, start_step: int, d: "dist.Dist") -> Loader:
    """This rank's batches from start_step on, loaded by worker processes."""
    batches = data.sampler.batches_for_rank(d.rank, d.world_size, args.grad_accum, start_step,
                                            data.max_steps)
    # Workers collate straight into shared memory: handing a batch over copies nothing.
    shared = args.num_workers > 0
    collate_fn = functools.partial(collate, shared=shared)
    if args.pack:
        collate_fn = functools.partial(collate_packed, capacity=args.pack, shared=shared,
                                       image_tokens=data.image_tokens)
    return Loader(data.dataset, batches, collate_fn, num_workers=args.num_workers,
                  timeout=args.loader_timeout, pin_memory=d.device.type == "cuda", seed=args.seed,
                  first_batch=start_step * args.grad_accum)


def forward_backward(par: "parallel.Parallel", micro: list[dict], autocast, device, d: "dist.Dist",
                     step: int, count_flops=None, skip_bad: bool = False) -> dict:
    """Forward and backward over one optimizer step's micro-batches. Returns, summed over the
    whole job: "loss" (the global mean), "tokens" (real LLM positions), "positions" (with the
    padding), "flops" (count_flops), "truncated" (samples cut at --max-length), "bad" (the
    samples of every rank whose image did not decode). The loss is normalised by the
    supervised-token count of the whole global batch (all ranks, all micro-batches), so any split
    of it over processes and accumulation gives the same loss and gradients. A sample whose image
    did not decode comes with its labels masked: with skip_bad it is left out of the loss and the
    count; without, every rank raises BadImageStop before any forward."""
    # The positions the model trains on (llava.trained_positions: the splice leaves their count
    # unchanged).
    local_tokens = 0
    for b in micro:
        local_tokens += int(trained_positions(b["labels"], b["attention_mask"]).sum())
    local_bad = [bad for b in micro for bad in b["bad"]]
    # The samples whose image did not decode travel in the same all-reduce: every rank learns of
    # any rank's before a forward.
    counts = torch.tensor([float(local_tokens), float(len(local_bad))], device=device)
    dist.all_reduce(d, counts, what=f"supervised-token count at step {step + 1}")
    global_tokens = max(counts[0].item(), 1.0)
    bad = []
    if counts[1].item():
        bad = bad_images(d, local_bad, step, skip_bad)
    # loss sum, real positions, all positions, FLOPs, truncated samples
    stats = torch.zeros(5, device=device, dtype=torch.float64)
    for m, batch in enumerate(micro):
        where = f"{m + 1}/{len(micro)} at step {step + 1}"
        d.heartbeat(step + 1, f"forward {m + 1}/{len(micro)}")
        pixels = batch["pixel_values"]
        if pixels is not None:
            pixels = pixels.to(device, non_blocking=True)
        with par.sync(last=m == len(micro) - 1, where=where):
            with autocast:
                input_ids = batch["input_ids"].to(device, non_blocking=True)
                labels = batch["labels"].to(device, non_blocking=True)
                mask = batch["attention_mask"].to(device, non_blocking=True)
                o = par.module(input_ids, pixels, labels=labels, attention_mask=mask)
            # DDP and FSDP average gradients over ranks; multiplying by world_size makes it the
            # global-batch sum.
            (o.loss_sum * (d.world_size / global_tokens)).backward()
        stats[0] += o.loss_sum.detach()
        # Packed rows number their samples 1, 2, ...: every position > 0 is real.
        stats[1] += (o.attention_mask > 0).sum()
        stats[2] += o.attention_mask.numel()
        if count_flops:
            images = 0
            if pixels is not None:
                images = pixels.shape[0]
            stats[3] += count_flops(o, images)
        stats[4] += batch["num_truncated"]
    dist.all_reduce(d, stats, what=f"loss sum at step {step + 1}")
    return {"loss": stats[0].item() / global_tokens, "tokens": int(stats[1]),
            "positions": int(stats[2]), "flops": float(stats[3]), "truncated": int(stats[4]),
            "bad": bad}


# Exit status of a run stopped by an image that does not decode (2 is a command-line mistake,
# 128 + N a signal).
BAD_IMAGE_EXIT = 3


class BadImageStop(Exception):
    """Raised on every rank, in the same step, when a sample's image did not decode and
    --skip-bad-samples is off; `finished` is the number of the last finished step."""

    def __init__(self, finished: int):
        super().__init__(f"an image did not decode in step {finished + 1}")
        self.finished = finished


def bad_images(d: "dist.Dist", local_bad: list[dict], step: int, skip_bad: bool) -> list[dict]:
    """A collective, called by every rank when any has a sample whose image did not decode: each
    rank logs its own (once per sample), all learn every rank's; without skip_bad, BadImageStop."""
    done = "left out of the loss (--skip-bad-samples)"
    if not skip_bad:
        done = "stops the run"
    for bad in local_bad:
        d.log(f"step {step + 1}: {bad['sample']} {done}: {bad['error']}")
    gathered = dist.all_gather_object(d, local_bad, what=f"bad images at step {step + 1}")
    if not skip_bad:
        raise BadImageStop(step)
    return [bad for rank_bad in gathered for bad in rank_bad]


def bad_image_stop_message(args, out: Path, finished: int, start_step: int) -> str:
    """What the run says when it stops on an image that does not decode: the checkpoint, then the
    three ways on."""
    folder = f"{out}/{checkpoint.CHECKPOINTS}/{checkpoint.step_name(finished)}"
    ckpt = f"checkpoint {folder}"
    if finished == 0:
        ckpt = "no step finished, nothing to save"
    elif finished == start_step:
        ckpt = f"the checkpoint it resumed from, {folder}"
    check = ["python", "-m", "llava_min.data", "check", "--data", *map(str, args.data),
             "--image-folder", str(args.image_folder), "--decode"]
    resume_cmd = stop.resume_command()
    skip_cmd = resume_cmd + ["--skip-bad-samples"]
    return (f"stopped before step {finished + 1}: an image above does not decode; {ckpt}. "
            "Ways on:\n"
            f"  list every image that does not decode:  {shlex.join(check)}\n"
            f"  after fixing or removing those samples: {shlex.join(resume_cmd)}\n"
            f"  or drop such samples from the loss:     {shlex.join(skip_cmd)}")


def optimizer_step(par: "parallel.Parallel", schedule: CosineSchedule, args, loss: float,
                   micro: list[dict], step: int, d: "dist.Dist") -> float | None:
    """Clip and apply the gradients; returns the gradient norm. A non-finite loss or gradient
    norm (the same on every rank: both are global) is never stepped into the weights: --nan stop
    raises, --nan skip drops the gradients and returns None. The schedule steps either way, so
    the learning rate stays that of the step."""
    grad_norm = math.nan
    if math.isfinite(loss):
        grad_norm = par.clip(args.clip, step + 1)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        par.step(step + 1)
    else:
        ids = [i for b in micro for i in b["ids"]]
        what = f"loss is {loss} (NaN/inf)"
        if math.isfinite(loss):
            what = f"the gradient norm is {grad_norm} (NaN/inf) with a finite loss {loss:.6g}"
        msg = (f"step {step + 1}: {what}. Samples of this rank's batches: {ids[:32]}. "
               "Try a lower --lr or --dtype float32")
        if args.nan == "stop":
            raise FloatingPointError(msg + ", or --nan skip to skip such steps")
        d.log(msg + " -- skipping this step")
        par.zero_grad()
    schedule.step()
    if finite:
        return grad_norm
    return None


def step_record(step: int, sums: dict, lr: float, grad_norm: float, seconds: float,
                peak: float | None, d: "dist.Dist") -> dict:
    """One line of OUT/metrics.jsonl."""
    record = {"step": step + 1, "loss": round(sums["loss"], 6), "lr": lr,
              "grad_norm": round(grad_norm, 4),
              "tokens_per_s": round(sums["tokens"] / seconds, 1),
              "padding": round(1 - sums["tokens"] / sums["positions"], 4),
              "truncated": sums["truncated"], "seconds": round(seconds, 3),
              "bad_samples": len(sums["bad"])}
    if sums["bad"]:
        # --skip-bad-samples: the files that did not decode, of the samples left out of this step
        record["bad_images"] = [bad["file"] for bad in sums["bad"]]
    if peak:
        record["mfu"] = round(sums["flops"] / (seconds * d.world_size * peak), 4)
    if d.device.type == "cuda":
        record["max_mem_gb"] = round(torch.cuda.max_memory_allocated(d.device) / 2**30, 2)
    return record


def write_record(record: dict, metrics, bar) -> None:
    if metrics:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}", pad=f"{record['padding']:.1%}")


# Saving

def save(par: "parallel.Parallel", schedule: CosineSchedule, args, out: Path, step: int, data: Data,
         frozen: dict, d: "dist.Dist", final: bool) -> None:
    """A checkpoint of what resume needs (atomic) and, at the end (`final`), the model itself in
    OUT. A collective: every rank calls it. The closing barrier's timeout adds what a slow disk
    needs for rank 0's bytes: a long save cannot trip --dist-timeout."""
    rng = dist.all_gather_object(d, checkpoint.capture_rng_state(),
                                 what=f"RNG states for checkpoint {step}")
    what = f"{out}/{checkpoint.CHECKPOINTS}/{checkpoint.step_name(step)}"
    if final:
        what += f" and the model in {out}"
    t0 = time.time()
    # Trained tensors in full precision (LoRA adapters unmerged) make resume bit-identical. Frozen
    # tensors are not saved: `frozen` names their sources, and resume checks that they are
    # unchanged.
    state = {"schedule": schedule.state_dict(), "step": step, "rng": rng, "frozen": frozen,
             "global_batch": data.global_batch, "world_size": d.world_size, "args": vars(args)}
    par.save_checkpoint(out, step, state, keep=args.keep)
    rewritten = _rewritten(par.model, data.src)
    output = None
    if final:
        # Under FSDP the parts OUT rewrites are gathered whole on rank 0 first (a collective).
        output = par.consolidated(rewritten)
    if d.rank == 0:
        plot_loss(out / "metrics.jsonl", out / "loss.png")
        if final:
            write_output(output, data.tok, args, out, data.src)
        d.log(f"saved {what} in {time.time() - t0:.1f} s")
    # Bytes rank 0 writes: fp32 trained weights and AdamW's two moments; at the end the parts it
    # writes or copies.
    size = 12 * sum(p.numel() for p in par.model.parameters() if p.requires_grad)
    if final:
        copied = rewritten
        if args.save_frozen == "copy":
            copied = PARTS
        size += sum(4 * p.numel() for part in copied for p in getattr(par.model, part).parameters())
    timeout_s = d.timeout_s + size / SLOW_DISK_BYTES_PER_S
    dist.barrier(d, what=f"rank 0's save of {what}", timeout_s=timeout_s)


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _rewritten(model: LLaVA, src: dict) -> set[str]:
    """The parts the output writes: trained ones, and frozen ones without a source; the rest are
    linked."""
    return {part for part in PARTS if src[part] is None or _trains(getattr(model, part))}


def write_output(model: LLaVA, tok: Tokenizer, args, out: Path, src: dict) -> None:
    """OUT/llm (InternLM2), OUT/vit (DINOv2), OUT/projector (XTuner), tokenizer.model,
    llava_config.json. A frozen part with a source is linked, copied or referenced
    (--save-frozen); save_pretrained folds LoRA adapters in."""
    rewritten = _rewritten(model, src)
    for part in PARTS:
        module = getattr(model, part)
        if part not in rewritten:
            how = checkpoint.publish_frozen(src[part], out / part, args.save_frozen)
            print(f"{part}: {how} {src[part]}", flush=True)
            continue
        if not _trains(module):
            dtype = None                   # frozen and freshly initialised: written as it was used
        elif args.save_dtype == "source" and src[part]:
            dtype = checkpoint.stored_dtype(src[part])
        elif args.save_dtype == "source":
            dtype = torch.float32
        else:
            dtype = getattr(torch, args.save_dtype)
        module.save_pretrained(out / part, dtype=dtype)
    write_atomic(out / "tokenizer.model", Path(tok.path).read_bytes())
    write_json(asdict(model.config), out / CONFIG_FILE)


if __name__ == "__main__":
    main(stage=1)
