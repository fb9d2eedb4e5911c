"""The memory estimator's numbers: parameter counts, byte arithmetic, the activation model and the fit search.

Proves:
  * parameter counts come from the configs alone and equal the real models' (InternLM2-7B: 7,737,708,544;
    LoRA r=512 on 7B: 32 x 512 x 73,728 as in the reference analysis), including which parameters really get
    gradients after a backward (a trained ViT's last block and final norm do not);
  * weights, gradients, DDP buckets, optimizer state (with and without ZeRO-1) and autocast copies are the
    documented bytes per parameter, and the total is their sum;
  * the activation model agrees within 3% with a measurement on a real LLaVA forward on the CPU (hidden
    256, 2 blocks, 512 tokens): the bytes of every distinct tensor storage autograd saves for backward,
    counted with torch.autograd.graph.saved_tensors_hooks, parameters excluded; in fp32, bf16 autocast,
    LoRA, frozen-LLM, checkpointed and trained-ViT set-ups;
  * the largest batch / length are the edge of what fits, and suggest_fit's flags make a plan fit;
  * host RAM per node is ranks per node x (what a rank holds + its loader workers), with the model in host RAM
    on the CPU and only one checkpoint shard at a time on CUDA, and a warning when it exceeds the node's RAM;
  * `python -m llava_min.memory` prints the table and the --json form, and reads an --init-from folder.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava_min import IGNORE_INDEX, IMAGE_TOKEN_INDEX, dinov2, internlm2
from llava_min.dinov2 import DINOv2, DINOv2Config
from llava_min.internlm2 import InternLM2, InternLM2Config
from llava_min.clip import CLIPConfig
from llava_min.llava import LLaVA, tower_of
from llava_min.siglip import SigLIPConfig
from llava_min.lora import apply_lora
from llava_min.projector import Projector
from llava_min.tools import memory

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30

# Small but not tiny: every tensor of a block is large against the per-forward constants.
LLM = InternLM2Config(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
VIT = DINOv2Config(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=112)
TOKENS, IMAGE = 512, 112


def preset_plan(**kw) -> memory.Plan:
    return memory.Plan(llm=internlm2.load_config("internlm2-7b"), vit=dinov2.load_config("dinov2-large"), **kw)


def build(train, dtype, lora_r=0, ckpt=False, vit=VIT) -> LLaVA:
    """A model set up the way train.py sets it up: trained parts fp32, frozen parts in the compute dtype."""
    torch.manual_seed(0)
    model = LLaVA(InternLM2(LLM), tower_of(vit)(vit), Projector(vit.hidden_size, LLM.hidden_size)).train()
    model.requires_grad_(False)
    for part in train:
        getattr(model, part).requires_grad_(True)
    if lora_r:
        apply_lora(model.llm, r=lora_r, dropout=0.05)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(getattr(torch, dtype))
    model.set_gradient_checkpointing(ckpt)
    return model


def batch():
    patches = (IMAGE // VIT.patch_size) ** 2
    ids = torch.randint(3, LLM.vocab_size, (1, TOKENS - patches + 1))   # one -200 becomes `patches` tokens
    ids[0, 1] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[0, :2] = IGNORE_INDEX
    return ids, torch.randn(1, 3, IMAGE, IMAGE), labels


# --------------------------------------------------------------------------------------------------

def test_parameter_counts_of_the_released_shapes():
    p = memory.param_counts(preset_plan())
    assert p["llm"] == 7_737_708_544
    assert p["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert memory.lora_parameters(internlm2.load_config("internlm2-7b"), 512) == 32 * 512 * 73_728
    assert p["trained"] == p["llm"] + p["projector"] and p["frozen"] == p["vit"]


@pytest.mark.parametrize("train,lora_r", [(("projector",), 0), (("projector", "llm"), 8),
                                          (("projector", "llm", "vit"), 0)])
def test_parameter_counts_match_real_models(train, lora_r):
    model = build(train, "float32", lora_r)
    plan = memory.Plan(llm=LLM, vit=VIT, train=train, lora_r=lora_r, batch_size=1, max_length=TOKENS,
                       image_size=IMAGE, dtype="float32", device="cpu")
    p = memory.param_counts(plan)
    assert p["llm"] == sum(t.numel() for n, t in model.llm.named_parameters() if "lora_" not in n)
    assert p["vit"] == sum(t.numel() for t in model.vit.state_dict().values())     # mask_token is a buffer
    assert p["projector"] == sum(t.numel() for t in model.projector.parameters())
    assert p["lora"] == sum(t.numel() for n, t in model.named_parameters() if "lora_" in n)
    # "trained" = the parameters that really receive a gradient (and so optimizer state)
    ids, px, labels = batch()
    model(ids, px, labels=labels).loss.backward()
    assert p["trained"] == sum(t.numel() for t in model.parameters() if t.grad is not None)
    assert p["trained"] + p["unused"] == sum(t.numel() for t in model.parameters() if t.requires_grad)
    assert p["trained"] + p["unused"] + p["frozen"] == sum(t.numel() for t in model.state_dict().values())


def test_bytes_per_parameter():
    plan = preset_plan(batch_size=1, world_size=4)
    e, p = memory.estimate(plan), memory.param_counts(plan)
    assert e.weights == 4 * p["trained"] + 2 * p["frozen"]
    assert e.gradients == 4 * p["trained"]
    assert e.ddp_buckets == 0                                   # train.py's DDP uses gradient_as_bucket_view
    assert memory.estimate(plan.replace(ddp_bucket_view=False)).ddp_buckets == 4 * p["trained"]
    assert e.optimizer == e.optimizer_unsharded == 8 * p["trained"]
    assert e.autocast_copies == 2 * p["trained_matmul"]
    assert e.total == (e.weights + e.gradients + e.ddp_buckets + e.optimizer + e.autocast_copies + e.cuda_context
                       + e.activation_total + e.logits)
    zero = memory.estimate(plan.replace(zero=True))
    assert zero.optimizer == 8 * p["trained"] // 4 and zero.total < e.total
    single = memory.estimate(plan.replace(world_size=1, zero=True))      # nothing to shard, no buckets
    assert single.optimizer == 8 * p["trained"] and single.ddp_buckets == 0
    fp32 = memory.estimate(plan.replace(dtype="float32"))
    assert fp32.autocast_copies == 0 and fp32.weights == 4 * (p["trained"] + p["frozen"])
    # The reference's figure for the logits of one 2048-token row: 2048 x 92,544 x 4 bytes = 0.76 GB. The
    # chunked loss keeps 1024 rows of it (fp32 log-softmax, its gradient and one more) plus the bf16 logits.
    assert e.logits == 1024 * 92_544 * 14
    ckpt = memory.estimate(plan.replace(grad_checkpointing=True))
    assert ckpt.activation_total < e.activation_total / 5
    assert ckpt.activations_other_mode == e.activation_total


@pytest.mark.parametrize("train,dtype,lora_r,ckpt", [
    (("projector", "llm"), "float32", 0, False),
    (("projector", "llm"), "bfloat16", 0, False),
    (("projector", "llm"), "bfloat16", 8, False),
    (("projector",), "bfloat16", 0, False),
    (("projector", "llm"), "bfloat16", 0, True),
    (("projector", "llm", "vit"), "bfloat16", 0, False),
    (("projector", "llm", "vit"), "float32", 0, True),
])
def test_activation_model_matches_saved_tensors(train, dtype, lora_r, ckpt):
    model = build(train, dtype, lora_r, ckpt)
    ids, px, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        measured, _ = memory.saved_activation_bytes(model, lambda: model(ids, px, labels=labels))
    plan = memory.Plan(llm=LLM, vit=VIT, train=train, lora_r=lora_r, batch_size=1, max_length=TOKENS,
                       image_size=IMAGE, grad_checkpointing=ckpt, dtype=dtype, device="cpu")
    e = memory.estimate(plan)
    # Autocast's bf16 weight copies are saved tensors too, except where the forward is checkpointed: the
    # output head (inside the checkpointed loss chunks) and, with checkpointing, the blocks' matrices. Those
    # live in autocast's cache until the forward ends, which is why the estimate books them all.
    unsaved = 0
    # A frozen ViT's features need no gradient: the projector's first matrix is not saved either.
    if dtype == "bfloat16" and "vit" not in train:
        unsaved += 2 * VIT.hidden_size * LLM.hidden_size
    if dtype == "bfloat16" and "llm" in train and not lora_r:
        unsaved += 2 * LLM.vocab_size * LLM.hidden_size
        if ckpt:
            qkv = (LLM.num_attention_heads + 2 * LLM.num_key_value_heads) * LLM.head_dim
            h, i = LLM.hidden_size, LLM.intermediate_size
            unsaved += 2 * LLM.num_hidden_layers * (qkv * h + h * h + 3 * h * i)
    expected = e.saved_activations + e.autocast_copies - unsaved
    assert abs(expected - measured) <= 0.03 * measured, f"estimate {expected:,} vs measured {measured:,} bytes"


# CLIP (CLS, pre-norm, quick-GELU) and SigLIP (no CLS, tanh-GELU) at the size of VIT.
OTHER_TOWERS = {"clip": CLIPConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                                   patch_size=14, image_size=112),
                "siglip": SigLIPConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                                       num_attention_heads=4, patch_size=14, image_size=112)}


@pytest.mark.parametrize("tower", OTHER_TOWERS)
@pytest.mark.parametrize("dtype,ckpt", [("bfloat16", False), ("float32", True)])
def test_other_towers_counts_and_activations(tower, dtype, ckpt):
    """Through the tower contract alone: the counts equal the real model's, the activations within 3%."""
    vit, train = OTHER_TOWERS[tower], ("projector", "llm", "vit")
    model = build(train, dtype, ckpt=ckpt, vit=vit)
    plan = memory.Plan(llm=LLM, vit=vit, train=train, batch_size=1, max_length=TOKENS, image_size=IMAGE,
                       grad_checkpointing=ckpt, dtype=dtype, device="cpu")
    p = memory.param_counts(plan)
    assert p["vit"] == sum(t.numel() for t in model.vit.state_dict().values())
    ids, px, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        measured, out = memory.saved_activation_bytes(model, lambda: model(ids, px, labels=labels))
    out.loss.backward()
    assert p["trained"] == sum(t.numel() for t in model.parameters() if t.grad is not None)
    e = memory.estimate(plan)
    unsaved = 2 * LLM.vocab_size * LLM.hidden_size if dtype == "bfloat16" else 0   # the head: checkpointed
    expected = e.saved_activations + e.autocast_copies - unsaved
    assert abs(expected - measured) <= 0.03 * measured, f"estimate {expected:,} vs measured {measured:,} bytes"


def test_fit_search_finds_the_edge():
    plan = memory.Plan(llm=internlm2.load_config("internlm2-1_8b"), vit=dinov2.load_config("dinov2-large"),
                       batch_size=1, grad_checkpointing=True)
    b = memory.largest_batch(plan, 80)
    assert b >= 2 and memory.fits(plan.replace(batch_size=b), 80)
    assert not memory.fits(plan.replace(batch_size=b + 1), 80)
    L = memory.largest_length(plan.replace(lora_r=64), 24)
    assert L % 64 == 0 and memory.fits(plan.replace(lora_r=64, max_length=L), 24)
    assert L == 32768 or not memory.fits(plan.replace(lora_r=64, max_length=L + 64), 24)
    assert memory.suggest_fit(plan.replace(lora_r=64), 80)[0].startswith("already fits")


def test_suggest_fit_makes_the_seven_billion_model_fit_24_gib():
    full = preset_plan(batch_size=1, world_size=4)          # the user story: 4 x 24 GB, batch size 1
    assert not memory.fits(full, 24)
    advice = memory.suggest_fit(full, 24)
    assert any(a.startswith("--lora-r") for a in advice), advice
    # The figure is printed to 0.1 GiB
    assert advice[-1].startswith("-> ") and float(advice[-1].split()[1]) <= round(0.95 * 24, 1)
    lora = preset_plan(batch_size=1, lora_r=128, grad_checkpointing=True)
    e = memory.estimate(lora)
    assert 15 * GiB < e.weights < 17 * GiB            # the frozen bf16 LLM dominates
    assert e.activation_total < 1.5 * GiB


def test_command_line(tmp_path):
    cmd = [sys.executable, "-m", "llava_min.memory", "--llm-config", "internlm2-7b", "--vit-config", "dinov2-large",
           "--batch-size", "1", "--max-length", "2048", "--nproc", "4", "--gpu-mem", "24", "--image-folder", "x"]
    text = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    assert "LLM 7,737,708,544" in text.stdout and "total (peak)" in text.stdout and "does NOT fit" in text.stdout
    assert "ignored, no effect on memory: --image-folder" in text.stdout
    assert "host RAM per node" in text.stdout
    js = subprocess.run(cmd + ["--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    out = json.loads(js.stdout)
    assert out["estimate"]["params"]["llm"] == 7_737_708_544 and out["fits"] is False
    assert out["largest_batch"] == 0 and out["suggest_fit"][-1].startswith("-> ")

    # --init-from reads the configs and the image size of a folder written by train.py
    model = LLaVA(InternLM2(internlm2.load_config("tiny")), DINOv2(dinov2.load_config("tiny")), Projector(64, 128))
    model.config.image_size = 56
    model.save_pretrained(tmp_path / "stage1")
    plan = memory.plan_from_args(argparse.Namespace(init_from=str(tmp_path / "stage1"), lora_r=4), device="cpu")
    assert (plan.llm.hidden_size, plan.vit.hidden_size, plan.image_size, plan.lora_r) == (128, 64, 56, 4)
    assert plan.dtype == "float32" and plan.train == ("projector", "llm")


def test_host_ram_per_node(tmp_path):
    data = tmp_path / "data.json"
    data.write_bytes(b" " * 10**8)
    args = argparse.Namespace(llm_config="internlm2-7b", vit_config="dinov2-large", batch_size=2, num_workers=3,
                              nproc_per_node=4, data=[str(data)])
    plan = memory.plan_from_args(args, device="cuda")
    assert (plan.nproc_per_node, plan.num_workers, plan.data_bytes) == (4, 3, 10**8)
    h = memory.host_bytes(plan)
    for phase in ("start", "load", "training"):       # node = ranks x (a rank's items [+ its workers])
        workers = 3 * sum(h["worker"].values()) if phase == "training" else 0
        assert h[phase] == 4 * (sum(h[f"rank_{phase}"].values()) + workers)
    assert h["rank_start"]["json.load peak"] == memory.JSON_PEAK * 10**8
    assert h["rank_training"]["sample table"] == 10**8
    # On CUDA a rank holds one shard of the frozen weights at a time, not the model
    assert h["rank_load"]["one checkpoint shard"] <= memory.MAX_SHARD < memory.estimate(plan).weights
    # On the CPU the host holds the model, its gradients and AdamW state: the whole GPU-style estimate
    cpu = memory.host_bytes(plan.replace(device="cpu"))
    assert cpu["rank_load"]["weights"] == memory.estimate(plan.replace(device="cpu")).weights
    assert cpu["rank_training"]["model, gradients, AdamW, activations"] == memory.estimate(
        plan.replace(device="cpu")).total
    assert memory.host_bytes(plan.replace(nproc_per_node=8))["training"] == 2 * h["training"]
    # The warning appears exactly when the largest phase exceeds the node's RAM
    peak = max(h["start"], h["load"], h["training"]) / GiB
    assert memory.host_warning(plan, peak + 1) is None
    warning = memory.host_warning(plan, peak - 1)
    assert warning.startswith("WARNING: host RAM:") and f"{peak - 1:.1f} GiB" in warning
    assert warning in memory.report(plan, 80, host_gib=peak - 1)
    assert "WARNING" not in memory.report(plan, 80, host_gib=peak + 1)


def test_host_ram_counts_every_rank_of_the_node_by_default(monkeypatch):
    """--nproc 4 on one node: four ranks' host RAM unless --nproc-per-node (or torchrun) says less;
    under FSDP on GPUs rank 0 also holds the whole model while loading, and the node's load figure is
    the printed line's sum."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = argparse.Namespace(llm_config="internlm2-1_8b", vit_config="dinov2-large", world_size=4)
    plan = memory.plan_from_args(args, device="cuda")
    assert plan.nproc_per_node == 4
    two = memory.plan_from_args(argparse.Namespace(**vars(args), nproc_per_node=2), device="cuda")
    assert two.nproc_per_node == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert memory.plan_from_args(args, device="cuda").nproc_per_node == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    sharded = plan.replace(fsdp=True)
    h = memory.host_bytes(sharded)
    whole = memory.estimate(sharded).load_host_rank0
    assert whole > 0 and h["rank0_load_extra"] == whole
    assert h["load"] == 4 * sum(h["rank_load"].values()) + whole
    assert memory.host_bytes(plan)["rank0_load_extra"] == 0
    line = [row for row in memory.report(sharded, 80).splitlines() if row.lstrip().startswith("loading")][0]
    assert f"{h['load'] / GiB:8.2f}" in line and f"rank 0's whole model {whole / GiB:.2f}" in line


def test_host_ram_command_line():
    cmd = [sys.executable, "-m", "llava_min.memory", "--llm-config", "internlm2-7b", "--vit-config", "dinov2-large",
           "--device", "cpu", "--nproc-per-node", "2", "--host-ram-gib", "64"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "host RAM per node: 2 ranks" in out.stdout and "WARNING: host RAM:" in out.stdout
    js = json.loads(subprocess.run(cmd + ["--json", "--host-ram-gib", "4096"], cwd=ROOT, capture_output=True,
                                   text=True, timeout=60).stdout)
    assert js["host_warning"] is None and js["host"]["training"] > js["host"]["load"] > 0


def test_fsdp_shards_the_seven_billion_full_fine_tune():
    """7B full fine-tune, bf16, checkpointing, batch 1: no fit under DDP or ZeRO-1 on 4 x 80 GB; FSDP shards
    weights, gradients and AdamW state by the world size and adds the gathered units; suggest_fit finds --fsdp."""
    for world, gpu in ((4, 80), (8, 48)):
        ddp = preset_plan(batch_size=1, grad_checkpointing=True, world_size=world)
        fsdp = ddp.replace(fsdp=True)
        a, b = memory.estimate(ddp), memory.estimate(fsdp)
        assert not memory.fits(ddp, gpu) and not memory.fits(ddp.replace(zero=True), gpu) and memory.fits(fsdp, gpu)
        assert b.optimizer == a.optimizer // world and b.gradients == a.gradients // world
        vit = 2 * b.params["vit"]                                     # the frozen ViT stays whole, in bf16
        assert b.weights == (a.weights - vit) // world + vit and b.load_host_rank0 == a.weights
        assert b.weights < b.load_peak < b.weights + 2 * GiB       # loading: shards + one whole tensor
        assert b.autocast_copies == 0 and 2 * GiB < b.fsdp_gathered < 8 * GiB
        assert b.total < a.total - 0.9 * (a.weights + a.gradients + a.optimizer) * (1 - 1 / world)
        assert "--fsdp" in memory.suggest_fit(ddp.replace(batch_size=4), gpu)
    assert memory.estimate(preset_plan(fsdp=True)).total == memory.estimate(preset_plan()).total   # one rank: DDP
    assert "FSDP gathered units" in memory.report(fsdp, 48) and ", FSDP," in memory.report(fsdp, 48)
