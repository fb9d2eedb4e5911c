"""Sequence packing (--pack N): whole samples laid end to end in rows, each attending only to itself.

Proves, on a tiny random fp32 LLaVA: a packed batch gives the unpacked batch's loss and gradients
over the same samples (1e-5), with and without gradient checkpointing, and each sample's logits
equal its logits alone; changing one sample's tokens leaves the other samples of its pack
unchanged; positions restart at 0 per sample. collate_packed keeps rows within N by the real
lengths (an estimate too low makes a row more, never a cut) and names a sample longer than N. The
packed sampler: a step's packs split over any world size x accumulation into the same samples,
jumping to a step gives what iterating gives, the fullest pack comes first, packs hold whole
samples within N by the estimates. The FLOP count of tools/flops.py is the same packed or padded
and follows its formula. With several images per sample (3, 1, 2, 4 and none): packed == unpacked
loss, gradients and logits, all images of the micro-batch in one ViT batch in the rows' order,
every image in the FLOP count and in the memory estimate (--images-per-sample). On CUDA (skipped
elsewhere), fp32 packed, padded and unpadded grouped-query attention runs with the math kernel
disallowed, the packed logits equal to the padded ones. Real processes: 2
ranks (torchrun, gloo) give 1 rank's losses and weights with --pack, and a run SIGKILLed after a
checkpoint resumes bit-identically with --pack.
"""
import argparse
import copy
import os
import signal
import subprocess
import time

import pytest
import torch

from llava_min import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG, LlavaMinError
from llava_min.data import collate, collate_packed
from llava_min.dinov2 import DINOv2, DINOv2Config
from llava_min.internlm2 import InternLM2, InternLM2Config, Packing
from llava_min.llava import LLaVA
from llava_min.projector import Projector
from llava_min.sampler import GlobalBatchSampler
from llava_min.tools import memory
from llava_min.tools.flops import StepFlops
from test_train import PY, ROOT, free_port, losses, run, shapes, stage1_args, weights  # noqa: F401 (fixture)

N_PATCHES = 4                                     # 28 px images in 14 px patches


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    llm = InternLM2(InternLM2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    vit = DINOv2(DINOv2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=28))
    m = LLaVA(llm, vit, Projector(32, 64)).train()
    m.requires_grad_(True)
    return m


def samples(seed=0):
    """Five samples of different lengths, three with an image, as LLaVADataset items."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, (n, image) in enumerate([(9, True), (5, False), (13, True), (3, False), (7, True)]):
        ids = torch.randint(3, 96, (n,), generator=g)
        if image:
            ids[1] = IMG
        labels = ids.clone()
        labels[: n // 2] = IGNORE_INDEX                # a prompt, then the answer
        labels[ids == IMG] = IGNORE_INDEX
        px = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8, generator=g) if image else None
        items.append({"index": i, "id": f"s{i}", "input_ids": ids, "labels": labels, "pixel_values": px})
    return items


def step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"],
                attention_mask=batch["attention_mask"])
    out.loss_sum.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def sample_logits(out, k_row, k):
    """Logits of the k-th sample (1-based) of row k_row."""
    return out.logits[k_row][out.attention_mask[k_row] == k]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_equals_unpacked_loss_gradients_and_logits(model, checkpointing):
    model.set_gradient_checkpointing(checkpointing)
    items = samples()
    packed = collate_packed(items, capacity=32, image_tokens=N_PATCHES)
    # Really packed
    assert packed["input_ids"].shape[0] == 2 and int(packed["attention_mask"].max()) > 1
    ref, ref_grads = step(model, collate(items))
    out, grads = step(model, packed)
    model.set_gradient_checkpointing(False)
    assert out.num_tokens == ref.num_tokens > 0
    assert abs(out.loss_sum.item() - ref.loss_sum.item()) < 1e-5 * ref.loss_sum.item()
    assert grads.keys() == ref_grads.keys() and any(n.startswith("vit.") for n in grads)
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max().item() < 1e-5, name
    # Each sample's logits in its pack equal its logits in its own padded row.
    alone = {s["id"]: ref.logits[row][ref.attention_mask[row] > 0] for row, s in enumerate(items)}
    order = iter(packed["ids"])
    with torch.no_grad():
        for r in range(packed["input_ids"].shape[0]):
            for k in range(1, int(packed["attention_mask"][r].max()) + 1):
                assert (sample_logits(out, r, k) - alone[next(order)]).abs().max().item() < 1e-5


def multi_image_samples(seed=1):
    """Six samples holding 3, 0, 1, 2, 0 and 4 images, placeholders spread through the prompt."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, (n, images) in enumerate([(14, 3), (5, 0), (9, 1), (11, 2), (6, 0), (12, 4)]):
        ids = torch.randint(3, 96, (n,), generator=g)
        ids[1:1 + 2 * images:2] = IMG                    # 1, 3, 5, ...: tags interleaved with text
        labels = ids.clone()
        labels[: 2 * images + 1] = IGNORE_INDEX          # the prompt, then the answer
        px = None
        if images:
            px = torch.randint(0, 256, (images, 3, 28, 28), dtype=torch.uint8, generator=g)
        items.append({"index": i, "id": f"m{i}", "input_ids": ids, "labels": labels, "pixel_values": px})
    return items


def test_packed_equals_unpacked_with_several_images_per_sample(model):
    """All 10 images of the micro-batch go through the ViT as one batch, packed or not, in the
    rows' order."""
    items = multi_image_samples()
    packed = collate_packed(items, capacity=40, image_tokens=N_PATCHES)
    padded = collate(items)
    assert packed["input_ids"].shape[0] < len(items) and int(packed["attention_mask"].max()) > 1
    assert packed["pixel_values"].shape == padded["pixel_values"].shape == (10, 3, 28, 28)
    # The packed batch's images are its samples' images in the packed order.
    by_id = {s["id"]: s["pixel_values"] for s in items if s["pixel_values"] is not None}
    expected = torch.cat([by_id[i] for i in packed["ids"] if i in by_id])
    assert torch.equal(packed["pixel_values"], expected)
    ref, ref_grads = step(model, padded)
    out, grads = step(model, packed)
    assert out.num_tokens == ref.num_tokens > 0
    assert abs(out.loss_sum.item() - ref.loss_sum.item()) < 1e-5 * ref.loss_sum.item()
    assert grads.keys() == ref_grads.keys() and any(n.startswith("vit.") for n in grads)
    for name, g in ref_grads.items():
        assert (grads[name] - g).abs().max().item() < 1e-5, name
    alone = {s["id"]: ref.logits[row][ref.attention_mask[row] > 0] for row, s in enumerate(items)}
    order = iter(packed["ids"])
    with torch.no_grad():
        for r in range(packed["input_ids"].shape[0]):
            for k in range(1, int(packed["attention_mask"][r].max()) + 1):
                assert (sample_logits(out, r, k) - alone[next(order)]).abs().max().item() < 1e-5
    # The FLOP count books each image's positions and ViT pass, packed or padded alike.
    count = StepFlops(model, N_PATCHES)
    assert count(out, 10) == pytest.approx(count(ref, 10), rel=1e-12)
    assert count(ref, 10) - count(ref, 9) == pytest.approx(count.image, rel=1e-12)


def test_a_changed_sample_leaves_the_others_in_its_pack_unchanged(model):
    items = samples()
    before = collate_packed(items, capacity=32, image_tokens=N_PATCHES)
    # Sample s2's text changes, its length does not
    items[2]["input_ids"][5:] = 7
    after = collate_packed(items, capacity=32, image_tokens=N_PATCHES)
    assert before["ids"] == after["ids"]
    with torch.no_grad():
        a = model(before["input_ids"], before["pixel_values"], attention_mask=before["attention_mask"])
        b = model(after["input_ids"], after["pixel_values"], attention_mask=after["attention_mask"])
    order = iter(before["ids"])
    changed = 0
    for r in range(before["input_ids"].shape[0]):
        for k in range(1, int(before["attention_mask"][r].max()) + 1):
            diff = (sample_logits(a, r, k) - sample_logits(b, r, k)).abs().max().item()
            if next(order) == "s2":
                changed += diff > 1e-3
            else:
                # Not even rounding: no score crosses a sample
                assert diff == 0.0
    assert changed == 1


def test_positions_restart_at_each_sample():
    mask = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 2, 3, 3, 3]])
    packing, positions = Packing.from_mask(mask)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 1, 2]]
    assert packing.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 9, 12] and packing.max_len == 3


def test_collate_packed_keeps_rows_within_n_by_real_lengths_and_names_a_sample_too_long():
    items = samples()
    sizes = {s["id"]: len(s["input_ids"]) + (N_PATCHES - 1) * (s["pixel_values"] is not None) for s in items}
    for capacity in (16, 20, 32, 64):
        b = collate_packed(items, capacity=capacity, image_tokens=N_PATCHES)
        assert sorted(b["ids"]) == sorted(sizes)          # every sample once, whole
        order = iter(b["ids"])
        for r in range(b["input_ids"].shape[0]):
            row = [next(order) for _ in range(int(b["attention_mask"][r].max()))]
            assert sum(sizes[i] for i in row) <= capacity
        assert b["pixel_values"].shape[0] == int(b["image_counts"].sum()) == 3
    with pytest.raises(LlavaMinError, match="s2.*16 LLM positions.*--pack"):
        collate_packed(items, capacity=15, image_tokens=N_PATCHES)


def lengths(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(10, 400, (n,), generator=g)
    return [int(s) * (1 if i % 4 else -1) for i, s in enumerate(sizes)]


def test_packed_sampler_splits_the_same_samples_over_any_world_and_resumes_in_o1():
    L = lengths()
    sampler = GlobalBatchSampler(L, 8, seed=2, pack=512)
    assert all(sum(abs(L[i]) for i in p) <= 512 for p in sampler.packs)   # by the estimates
    assert sorted(i for p in sampler.packs for i in p) == list(range(len(L)))
    for world, accum in [(1, 1), (2, 1), (2, 2), (4, 2)]:
        for s in (0, 3, sampler.steps_per_epoch + 1):
            pieces = [sampler.local_batch(s, r, world, m, accum) for m in range(accum) for r in range(world)]
            assert sorted(sum(pieces, [])) == sorted(sampler.global_batch(s))
    fresh = GlobalBatchSampler(L, 8, seed=2, pack=512)
    later = sampler.steps_per_epoch + 2
    assert list(fresh.batches_for_rank(1, 2, 2, start_step=later, stop_step=later + 1)) == \
        [sampler.local_batch(later, 1, 2, m, 2) for m in range(2)]
    # The epoch's fullest pack is rank 0's first micro-batch of step 0; another epoch packs
    # differently.
    first = sampler.epoch_batches(0)[0, 0]
    fill = [sum(abs(L[i]) for i in p) for p in sampler.packs]
    assert fill[first] == max(fill)
    assert sampler.global_batch(0) != sampler.global_batch(sampler.steps_per_epoch)


def test_two_processes_match_one_and_sigkill_resume_is_bit_identical_with_packing(shapes, tmp_path):
    common = ["--train", "all", "--max-steps", "4", "--lr", "1e-3", "--pack", "256", "--save-every", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    run([PY, *stage1_args(shapes, one, "--batch-size", 2, "--num-workers", 1, *common)])
    run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         *stage1_args(shapes, two, "--batch-size", 1, *common)], timeout=300)
    ref = losses(one)
    assert len(ref) == 4 and losses(two) == pytest.approx(ref, abs=1e-5)
    w1, w2 = weights(one), weights(two)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5

    cut = tmp_path / "cut"
    args = [PY, *map(str, stage1_args(shapes, cut, "--batch-size", 2, "--num-workers", 1, *common))]
    proc = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = cut / "checkpoints" / "latest"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not latest.exists():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)                # the trainer and its loader worker, at once
    proc.wait()
    assert latest.exists(), "no checkpoint was written before the kill"
    killed_at = latest.read_text().strip()
    run(args + ["--resume"])
    assert killed_at < "step-000004"
    a, b = weights(one), weights(cut)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume from {killed_at}"
    assert losses(cut) == ref
    refused = run([PY, *stage1_args(shapes, cut, "--batch-size", 2, *common[:-4], "--pack", 512, "--resume",
                                    "--max-steps", 6)], check=False)
    assert refused.returncode != 0 and "--pack" in refused.stderr


def test_flop_count_is_the_same_packed_or_padded_and_follows_the_formula(model):
    items = samples()
    model.vit.requires_grad_(False)
    count = StepFlops(model, N_PATCHES)
    model.vit.requires_grad_(True)
    with torch.no_grad():
        padded = model(**{k: collate(items)[k] for k in ("input_ids", "pixel_values", "labels", "attention_mask")})
        packed = model(**{k: collate_packed(items, 32, N_PATCHES)[k]
                          for k in ("input_ids", "pixel_values", "labels", "attention_mask")})
    assert count(packed, 3) == pytest.approx(count(padded, 3), rel=1e-12)
    lengths = [len(s["input_ids"]) + (N_PATCHES - 1) * (s["pixel_values"] is not None) for s in items]
    layers = sum(p.numel() for p in model.llm.model.layers.parameters() if p.dim() > 1)
    llm = 6 * layers * sum(lengths) + 6 * model.llm.output.weight.numel() * padded.num_tokens \
        + 6 * 2 * 64 * sum(n * n for n in lengths)        # 2 layers, width 64
    assert count(padded, 0) == pytest.approx(llm, rel=1e-12)


def test_the_memory_estimate_books_a_packed_row_of_n_positions():
    args = argparse.Namespace(llm_config="tiny", vit_config="tiny", image_size=28, batch_size=2, max_length=64)
    plain = memory.plan_from_args(args, device="cpu")
    packed = memory.plan_from_args(argparse.Namespace(**vars(args), pack=256), device="cpu")
    assert (plain.max_length, packed.max_length) == (64, 256)
    assert packed.images_per_sample == 256 // (N_PATCHES + 1)
    assert memory.estimate(packed).total > memory.estimate(plain).total


@pytest.mark.skipif(not torch.cuda.is_available(), reason="which SDPA kernel runs is a question of CUDA")
def test_fp32_on_cuda_packs_and_runs_grouped_query_attention_without_the_math_kernel(model):
    """fp32 on CUDA has no flash kernel (varlen_attn refuses it) and the memory-efficient kernel takes
    no enable_gqa: packed rows, padded rows and unpadded rows of the GQA model (4 query heads, 2 KV
    heads) must all run with the math kernel (which holds every (T, S) score) disallowed, and the
    packed samples' logits equal their padded ones."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    gpu = copy.deepcopy(model).cuda().eval()
    items = samples()

    def on_gpu(batch):
        return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}

    packed = on_gpu(collate_packed(items, capacity=32, image_tokens=N_PATCHES))
    padded = on_gpu(collate(items))
    with torch.no_grad(), sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        out = gpu(packed["input_ids"], packed["pixel_values"], labels=packed["labels"],
                  attention_mask=packed["attention_mask"])
        ref = gpu(padded["input_ids"], padded["pixel_values"], labels=padded["labels"],
                  attention_mask=padded["attention_mask"])
        # No padding: the unmasked grouped-query path.
        logits = gpu.llm(torch.randint(3, 96, (2, 40), device="cuda"))
    assert torch.isfinite(logits).all()
    alone = {s["id"]: ref.logits[row][ref.attention_mask[row] > 0] for row, s in enumerate(items)}
    order = iter(packed["ids"])
    for r in range(packed["input_ids"].shape[0]):
        for k in range(1, int(packed["attention_mask"][r].max()) + 1):
            assert (sample_logits(out, r, k) - alone[next(order)]).abs().max().item() < 1e-4


def test_the_memory_estimate_books_every_image_of_a_sample():
    args = argparse.Namespace(llm_config="tiny", vit_config="tiny", image_size=28, batch_size=2, max_length=64)
    one = memory.plan_from_args(args, device="cpu")
    three = memory.plan_from_args(argparse.Namespace(**vars(args), images_per_sample=3), device="cpu")
    assert (one.images_per_sample, three.images_per_sample) == (1, 3)
    # The ViT's and projector's shares triple (at a fixed max_length, the image positions leave
    # fewer for text).
    small, large = memory.estimate(one), memory.estimate(three)
    assert large.vit_transient == 3 * small.vit_transient > 0
    assert large.activations["projector"] == 3 * small.activations["projector"] > 0
    run = subprocess.run([PY, "-m", "llava_min.memory", "--llm-config", "tiny", "--vit-config", "tiny",
                          "--device", "cpu", "--images-per-sample", "3", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert '"images_per_sample": 3' in run.stdout
