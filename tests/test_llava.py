"""LLaVA (llava_min/llava.py) is transformers' LlavaForConditionalGeneration, loaded from the
official formats.

Proves, on a tiny random fp32 model written as three official-format folders (InternLM2 with its fused wqkv,
sharded; DINOv2 hub names; XTuner projector) and loaded through LLaVA.from_pretrained(llm=, vit=, projector=):
  * logits, loss and gradients equal LlavaForConditionalGeneration holding the same weights to 1e-4, on a
    right-padded batch with two images in one row and a text-only row;
  * greedy generate() gives transformers' tokens (same stop id, same padding after it), for one prompt and for
    a left-padded batch of two prompts of different lengths, each row also equal to that prompt alone;
  * a placeholder / image count mismatch names the per-row counts; save_pretrained -> from_pretrained is exact;
    a saved model whose llm/ or vit/ links to a folder that is gone names the link and the fix;
  * a frozen ViT builds no autograd graph while the projector still gets gradients; a text-only batch
    reaches the same parameters as an image batch (zero gradients, not None), so DDP sees no unused ones;
  * sampling with a seeded generator repeats itself; the chunked supervised-only loss equals a plain
    cross-entropy over the full logits, gradients included; gradient checkpointing changes nothing, with
    right or left padding; a batch without a supervised token still reaches every parameter;
  * several images per sample (3 in one row, 1 in another) equal the same features spliced by hand, position
    by position, and transformers on a multi-image prompt (logits, loss, greedy tokens) at 1e-4.
"""
import shutil

import pytest
import torch
import torch.nn.functional as F

from _ckpt_llava import expand_image_tokens, write_tiny_llava
from llava_min import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG, LlavaMinError
from llava_min.internlm2 import InternLM2Config
from llava_min.llava import LLaVA

# 2 x 2 patches of 14 px; the checkpoint's 42 px (3 x 3) position grid is interpolated
IMAGE_SIZE = 28
N_PATCHES = 4
VOCAB = 128
IMAGE_TOKEN_ID = VOCAB - 1   # transformers' placeholder id; prompts below never use it
NO_STOP = [-1]               # a stop id no token can equal: generation runs to max_new_tokens

LLM = InternLM2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0)
VIT = dict(hidden=32, layers=3, heads=4, image_size=42)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(checkpoint folder, transformers reference) shared by the tests: writing it is the slow part.
    """
    path = tmp_path_factory.mktemp("llava")
    hf = write_tiny_llava(path, LLM, vit=VIT, image_token_id=IMAGE_TOKEN_ID)
    return path, hf


@pytest.fixture
def model(folder):
    path, _ = folder
    return LLaVA.from_pretrained(llm=path / "llm", vit=path / "vit", projector=path / "projector")


@pytest.fixture
def hf(folder):
    return folder[1]


def pixels(n, seed=0):
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def sft_batch():
    """Right-padded batch: row 0 holds two images, row 1 is text only. Labels -100 on the prompt
    and padding."""
    input_ids = torch.tensor([[1, 5, IMG, 7, 8, IMG, 9, 10, 11, 0, 0, 0],
                              [1, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 0]])
    attention_mask = torch.tensor([[1] * 9 + [0] * 3, [1] * 11 + [0]])
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    # Row 0 answers "10 11" (9 is the prompt's end)
    labels[0, :7] = IGNORE_INDEX
    labels[1, :6] = IGNORE_INDEX                              # row 1 answers "26 .. 30"
    return input_ids, pixels(2), labels, attention_mask


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------------------------------
# Parity with transformers

def test_logits_loss_and_gradients_match_transformers(model, hf):
    input_ids, pixel_values, labels, mask = sft_batch()
    out = model(input_ids, pixel_values, labels=labels, attention_mask=mask)
    hf_ids, hf_mask, hf_labels = expand_image_tokens(input_ids, mask, N_PATCHES, IMAGE_TOKEN_ID, labels)
    ref = hf(input_ids=hf_ids, pixel_values=pixel_values, attention_mask=hf_mask, labels=hf_labels)

    # Both keep right padding; llava-min's rows are longer only by the padding slots of the input.
    real = out.attention_mask.bool()
    assert real.sum(1).tolist() == hf_mask.sum(1).tolist() == [7 + 2 * N_PATCHES, 11]
    assert max_diff(out.logits[real], ref.logits[hf_mask.bool()]) < 1e-4
    assert torch.equal(out.labels[real], hf_labels[hf_mask.bool()])
    assert out.num_tokens == int((hf_labels[:, 1:] != IGNORE_INDEX).sum()) == 2 + 5
    assert abs(out.loss.item() - ref.loss.item()) < 1e-4

    out.loss.backward()
    ref.loss.backward()
    pairs = [(model.projector.model[0].weight, hf.model.multi_modal_projector.linear_1.weight),
             (model.projector.model[2].bias, hf.model.multi_modal_projector.linear_2.bias),
             (model.llm.output.weight, hf.lm_head.weight),
             (model.llm.model.layers[1].feed_forward.w2.weight, hf.model.language_model.layers[1].mlp.down_proj.weight),
             (model.vit.encoder.layer[0].mlp.fc1.weight, hf.model.vision_tower.encoder.layer[0].mlp.fc1.weight)]
    for ours, theirs in pairs:
        assert theirs.grad.abs().max() > 0
        assert max_diff(ours.grad, theirs.grad) < 1e-4
    hf.zero_grad(set_to_none=True)


def hf_generate(hf, input_ids, pixel_values, mask, stop, max_new_tokens=10):
    hf_ids, hf_mask, _ = expand_image_tokens(input_ids, mask, N_PATCHES, IMAGE_TOKEN_ID, padding_side="left")
    with torch.no_grad():
        out = hf.generate(input_ids=hf_ids, pixel_values=pixel_values, attention_mask=hf_mask,
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
    return out[:, hf_ids.shape[1]:]


def test_greedy_generation_matches_transformers_and_stops(model, hf):
    input_ids = torch.tensor([[1, 5, IMG, 7, 8, 9]])
    px = pixels(1, seed=1)
    free = model.generate(input_ids, px, max_new_tokens=10, stop_ids=NO_STOP)
    assert free.shape == (1, 10)
    assert torch.equal(free, hf_generate(hf, input_ids, px, torch.ones_like(input_ids), NO_STOP))

    # Stop on the 4th token (its first occurrence): both stop there, and the stop token is
    # returned.
    k = next(i for i in range(3, 10) if int(free[0, i]) not in free[0, :i].tolist())
    stop = [int(free[0, k])]
    ours = model.generate(input_ids, px, max_new_tokens=10, stop_ids=stop)
    assert torch.equal(ours, free[:, :k + 1])
    assert torch.equal(ours, hf_generate(hf, input_ids, px, torch.ones_like(input_ids), stop))


def test_left_padded_batch_generation_matches_transformers_and_each_prompt_alone(model, hf):
    input_ids = torch.tensor([[0, 0, 0, 0, 1, 5, IMG, 7],
                              [1, IMG, 11, 12, 13, 14, 15, 16]])
    mask = (torch.arange(8)[None] >= torch.tensor([[4], [0]])).long()
    px = pixels(2, seed=0)
    ours = model.generate(input_ids, px, max_new_tokens=10, attention_mask=mask, stop_ids=NO_STOP)
    assert torch.equal(ours, hf_generate(hf, input_ids, px, mask, NO_STOP))
    for b in range(2):
        alone = model.generate(input_ids[b][mask[b].bool()][None], px[b:b + 1], max_new_tokens=10, stop_ids=NO_STOP)
        assert torch.equal(ours[b:b + 1], alone)

    # Row 1 stops early (on a token row 0 never produces): it is padded with the stop id, row 0
    # runs on.
    k = next(i for i in range(2, 10)
             if int(ours[1, i]) not in ours[1, :i].tolist() and int(ours[1, i]) not in ours[0].tolist())
    stop = [int(ours[1, k])]
    stopped = model.generate(input_ids, px, max_new_tokens=10, attention_mask=mask, stop_ids=stop)
    assert torch.equal(stopped[0], ours[0])
    assert torch.equal(stopped[1], torch.cat([ours[1, :k + 1], torch.full((9 - k,), stop[0])]))
    assert torch.equal(stopped, hf_generate(hf, input_ids, px, mask, stop))


# --------------------------------------------------------------------------------------------------
# Several images in one sample

def multi_image_batch():
    """Right-padded batch: row 0 interleaves 3 images with text, row 1 holds 1 image; pixels in
    row-major order."""
    input_ids = torch.tensor([[1, 5, IMG, 7, IMG, 8, 9, IMG, 10, 11, 12],
                              [1, 21, 22, IMG, 23, 24, 25, 26, 0, 0, 0]])
    mask = torch.tensor([[1] * 11, [1] * 8 + [0] * 3])
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :9] = IGNORE_INDEX                              # row 0 answers "11 12"
    labels[1, :5] = IGNORE_INDEX                              # row 1 answers "25 26"
    return input_ids, pixels(4, seed=3), labels, mask


def test_three_images_and_one_equal_the_features_spliced_by_hand(model):
    """Position by position: each placeholder is replaced by its own image's N projected patches,
    in order."""
    input_ids, px, labels, mask = multi_image_batch()
    out = model(input_ids, px, labels=labels, attention_mask=mask)
    with torch.no_grad():
        feats = model.image_features(px)                      # (4, N, D), images in order
    image = 0
    rows = []
    for b in range(2):
        row = []
        for t in range(int(mask[b].sum())):
            token = int(input_ids[b, t])
            if token == IMG:
                row += list(feats[image])                     # N rows of (D,)
                image += 1
            else:
                row.append(model.llm.embed(torch.tensor([token]))[0])
        rows.append(torch.stack(row))
    assert image == 4 and [len(r) for r in rows] == [8 + 3 * N_PATCHES, 7 + N_PATCHES]
    embeds, _, spliced_mask = model.embed(input_ids, px, labels, mask)
    for b, row in enumerate(rows):
        assert torch.equal(spliced_mask[b, :len(row)], torch.ones(len(row), dtype=spliced_mask.dtype))
        assert max_diff(embeds[b, :len(row)], row) == 0
        # The spliced row through the LLM by hand
        alone = model.llm.forward_hidden(row[None])
        assert max_diff(out.hidden[b, :len(row)], alone[0]) < 1e-5


def test_a_multi_image_prompt_matches_transformers(model, hf):
    input_ids, px, labels, mask = multi_image_batch()
    out = model(input_ids, px, labels=labels, attention_mask=mask)
    hf_ids, hf_mask, hf_labels = expand_image_tokens(input_ids, mask, N_PATCHES, IMAGE_TOKEN_ID, labels)
    ref = hf(input_ids=hf_ids, pixel_values=px, attention_mask=hf_mask, labels=hf_labels)
    real = out.attention_mask.bool()
    assert real.sum(1).tolist() == hf_mask.sum(1).tolist() == [8 + 3 * N_PATCHES, 7 + N_PATCHES]
    assert max_diff(out.logits[real], ref.logits[hf_mask.bool()]) < 1e-4
    assert abs(out.loss.item() - ref.loss.item()) < 1e-4
    # Swapping two images of row 0 changes its logits: the order of the images is the order of the
    # tags.
    swapped = model(input_ids, px[[1, 0, 2, 3]], attention_mask=mask)
    assert max_diff(swapped.logits[0], out.logits[0]) > 1e-3
    # Greedy generation from a two-image prompt: transformers' tokens.
    prompt = torch.tensor([[1, 5, IMG, 7, IMG, 8, 9]])
    ours = model.generate(prompt, px[:2], max_new_tokens=8, stop_ids=NO_STOP)
    assert torch.equal(ours, hf_generate(hf, prompt, px[:2], torch.ones_like(prompt), NO_STOP, max_new_tokens=8))


# --------------------------------------------------------------------------------------------------
# Errors, saving

def test_image_count_mismatch_names_the_rows(model):
    input_ids, _, _, mask = sft_batch()
    with pytest.raises(ValueError, match=r"2 image placeholders.*per batch row: \[2, 0\].*1 images"):
        model(input_ids, pixels(1), attention_mask=mask)
    with pytest.raises(ValueError, match=r"per batch row: \[2, 0\].*0 images"):
        model(input_ids, None, attention_mask=mask)


def test_projector_of_the_wrong_width_names_both_sizes(folder, tmp_path):
    from _ckpt_dinov2 import write_tiny_projector

    path, _ = folder
    write_tiny_projector(tmp_path / "proj", vision_hidden=VIT["hidden"], llm_hidden=48)
    with pytest.raises(ValueError, match=r"32 -> 48.*ViT width is 32 and the LLM width 64"):
        LLaVA.from_pretrained(llm=path / "llm", vit=path / "vit", projector=tmp_path / "proj")


def test_without_projector_a_fresh_one_is_built(folder):
    path, _ = folder
    model = LLaVA.from_pretrained(llm=path / "llm", vit=path / "vit")
    assert (model.projector.model[0].in_features, model.projector.model[-1].out_features) == (32, 64)
    input_ids, px, labels, mask = sft_batch()
    assert torch.isfinite(model(input_ids, px, labels=labels, attention_mask=mask).loss)


def test_save_and_load_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path / "out")
    for part in ("llm", "vit", "projector"):
        assert (tmp_path / "out" / part / "config.json").exists()
    again = LLaVA.from_pretrained(tmp_path / "out")
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert again.config == model.config
    input_ids, px, labels, mask = sft_batch()
    assert torch.equal(model(input_ids, px, labels=labels, attention_mask=mask).loss,
                       again(input_ids, px, labels=labels, attention_mask=mask).loss)


def test_a_dangling_link_to_a_frozen_part_names_the_link_and_the_fix(model, tmp_path):
    model.save_pretrained(tmp_path / "source")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("llava_config.json", "projector"):
        shutil.move(tmp_path / "source" / name, out / name)
    for part in ("llm", "vit"):
        (out / part).symlink_to(tmp_path / "source" / part, target_is_directory=True)
    assert LLaVA.from_pretrained(out).config == model.config        # loads through the links
    shutil.move(tmp_path / "source", tmp_path / "moved")
    with pytest.raises(LlavaMinError, match=r"out/llm is a symbolic link to .*source/llm, which no longer exists; "
                                            r"restore the source folder, or re-save .* --save-frozen copy"):
        LLaVA.from_pretrained(out)


# --------------------------------------------------------------------------------------------------
# Training behaviour

def vit_block_outputs(model, run):
    """Outputs of every ViT block during run()."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in model.vit.encoder.layer]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("vit_trains", [False, True])
def test_a_frozen_vit_builds_no_graph(model, vit_trains):
    model.train()
    model.vit.requires_grad_(vit_trains)
    input_ids, px, labels, mask = sft_batch()
    outs = []
    seen = vit_block_outputs(model, lambda: outs.append(model(input_ids, px, labels=labels, attention_mask=mask)))
    assert seen and all((o.grad_fn is not None) == vit_trains for o in seen)
    outs[0].loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.projector.parameters())
    assert all((p.grad is not None) == vit_trains for p in model.vit.encoder.layer[0].parameters())


@pytest.mark.parametrize("vit_trains", [False, True])
def test_a_text_only_batch_reaches_the_same_parameters_as_an_image_batch(model, vit_trains):
    model.train()
    model.vit.requires_grad_(vit_trains)
    input_ids, px, labels, mask = sft_batch()

    def used(ids, pixel_values, lab, m):
        model.zero_grad(set_to_none=True)
        model(ids, pixel_values, labels=lab, attention_mask=m).loss.backward()
        return {name for name, p in model.named_parameters() if p.grad is not None}

    with_images = used(input_ids, px, labels, mask)
    text_only = used(input_ids[1:], None, labels[1:], mask[1:])
    assert text_only == with_images
    assert all(p.grad is not None and not p.grad.any() for p in model.projector.parameters())


def test_sampling_with_a_seeded_generator_repeats(model):
    input_ids, px = torch.tensor([[1, 5, IMG, 7]]), pixels(1, seed=3)

    def sample(seed):
        return model.generate(input_ids, px, max_new_tokens=12, temperature=1.0, top_p=0.9, stop_ids=NO_STOP,
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_chunked_loss_equals_cross_entropy_over_full_logits(model):
    model.train()
    input_ids, px, labels, mask = sft_batch()
    # 7 targets: chunks 3, 3, 1
    out = model(input_ids, px, labels=labels, attention_mask=mask, loss_chunk=3)
    grads = torch.autograd.grad(out.loss, list(model.projector.parameters()), retain_graph=True)
    logits = model.llm.output(out.hidden).float()                                  # (B, T', vocab)
    naive = F.cross_entropy(logits[:, :-1].flatten(0, 1), out.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    naive_grads = torch.autograd.grad(naive, list(model.projector.parameters()))
    assert abs(out.loss.item() - naive.item()) < 1e-5
    assert out.loss_sum.item() == pytest.approx(naive.item() * out.num_tokens, rel=1e-5)
    assert all(max_diff(a, b) < 1e-6 for a, b in zip(grads, naive_grads))


def test_uint8_pixels_are_normalised_on_the_model_side(model):
    """The training data set yields uint8 pixels; the model must see exactly image.preprocess's floats.
    """
    from llava_min.image import normalize
    pixels = torch.randint(0, 256, (2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    with torch.no_grad():
        features = model.image_features(pixels)
        assert torch.equal(features, model.image_features(normalize(pixels)))
        # Raw 0..255 would differ
        assert not torch.equal(features, model.image_features(pixels.float()))


# --------------------------------------------------------------------------------------------------
# Gradient checkpointing, padding on either side, a batch without a supervised token

def left_padded(input_ids, labels, mask):
    """The same rows with their padding moved to the front."""
    shifts = (mask == 0).sum(1).tolist()
    roll = lambda t: torch.stack([row.roll(s) for row, s in zip(t, shifts)])  # noqa: E731
    return roll(input_ids), roll(labels), roll(mask)


def grads_of(model, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("padding", ["right", "left"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model, padding):
    model.train()
    model.vit.requires_grad_(True)
    input_ids, px, labels, mask = sft_batch()
    if padding == "left":  # an explicit attention mask instead of the causal fast path
        input_ids, labels, mask = left_padded(input_ids, labels, mask)
    batch = dict(input_ids=input_ids, pixel_values=px, labels=labels, attention_mask=mask)
    plain, plain_grads = grads_of(model, **batch)
    model.set_gradient_checkpointing(True)
    recomputed, recomputed_grads = grads_of(model, **batch)
    model.set_gradient_checkpointing(False)
    assert recomputed.num_tokens == plain.num_tokens == 7
    assert abs(recomputed.loss.item() - plain.loss.item()) < 1e-6
    assert set(recomputed_grads) == set(plain_grads)
    assert {n for n, _ in model.llm.named_parameters(prefix="llm")} <= set(plain_grads)
    for name, g in plain_grads.items():
        assert max_diff(recomputed_grads[name], g) < 1e-5, name


def test_without_a_supervised_token_the_loss_still_reaches_every_parameter(model):
    model.train()
    input_ids, px, labels, mask = sft_batch()
    _, some_grads = grads_of(model, input_ids=input_ids, pixel_values=px, labels=labels, attention_mask=mask)
    nothing = torch.full_like(labels, IGNORE_INDEX)
    out, grads = grads_of(model, input_ids=input_ids, pixel_values=px, labels=nothing, attention_mask=mask)
    assert out.num_tokens == 0 and out.loss.item() == 0.0
    assert set(grads) == set(some_grads)  # DDP sees the same parameters used (with zero gradients)
    assert {n for n, _ in model.llm.named_parameters(prefix="llm")} <= set(grads)
    assert not any(g.any() for g in grads.values())
