"""`python -m llava_min.export`: a llava-min folder becomes a transformers
LlavaForConditionalGeneration folder that loads with transformers alone, no remote code, and is the
same model.

Proves, on a tiny model trained by finetune.py (LoRA, merged on save) and exported by the command
line, loaded with LlavaForConditionalGeneration + AutoProcessor: on several images (wide, tall,
square, RGBA, grey) and prompts (one turn, a system prompt, two turns, text only) the processor's
prompt ids equal llava-min's (each image's run of <image> ids read as one -200), whether the
template is rendered and then tokenized or apply_chat_template tokenizes (one BOS either way); pixel
values within 1e-3 (pad and crop modes); logits within 1e-4 in fp32; the same greedy tokens; three
images in one prompt give the same logits. The same for a model with a CLIP and one with a SigLIP
tower (train.py, one step): prompt ids, pixels in pad and crop modes, logits, greedy tokens. With
the real InternLM2 tokenizer: the same prompt ids on real-format text (CJK, code, whitespace runs,
emoji). A bf16 frozen LLM is exported bit for bit
(after the parity tests' wqkv split); sharded output loads; CLIP and SigLIP vision-only saves load
with every tensor found. Refused, with the reason: DINOv2 with registers, a 3-layer projector, a
projector of another width, an LLM vocabulary with no free id for <image>, a tokenizer with a dummy
prefix, a CLIP tower at another image size, a LoRA adapter left in llm/, a checkpoint folder, an OUT
that is not an earlier export.
"""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from _ckpt_dinov2 import write_tiny_dinov2, write_tiny_projector
from _ckpt_internlm2 import random_internlm2_state, split_wqkv, write_internlm2_checkpoint
from conftest import ROOT
from llava_min import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaMinError
from llava_min.chat import prompt_ids
from llava_min.data import encode_conversation
from llava_min.export import export
from llava_min.export import main as export_main
from llava_min.image import preprocess
from llava_min.internlm2 import InternLM2Config
from llava_min.llava import LLaVA
from llava_min.tokenizer import CHAT_TOKENS, Tokenizer
from llava_min.tools.tokenizer_train import train as train_tokenizer

transformers = pytest.importorskip("transformers")
PY = sys.executable
# The tiny DINOv2 (a 56 px position grid, 14 px patches) at 28 px: 2 x 2 patches, interpolated
IMAGE_SIZE = 28


def run(args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([PY, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert p.returncode == 0, f"{args} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


def load_hf(folder):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    processor = transformers.AutoProcessor.from_pretrained(folder, backend="pil")
    return model.eval(), processor


def images():
    """Wide, tall, square, RGBA and grey images with structure (noise and a block), so that a shifted
    pad or another resize kernel shows."""
    out = []
    shapes = [(60, 31, "RGB"), (23, 50, "RGB"), (40, 40, "RGB"), (37, 29, "RGBA"), (33, 45, "L")]
    for k, (w, h, mode) in enumerate(shapes):
        g = torch.Generator().manual_seed(k)
        data = (torch.rand(h, w, 4, generator=g) * 255).to(torch.uint8)
        data[: h // 2, : w // 3] = torch.tensor([250, 20, 20, 128], dtype=torch.uint8)
        out.append(Image.fromarray(data.numpy(), "RGBA").convert(mode))
    return out


def collapse(ids, image_id):
    """transformers' prompt ids -> llava-min's: each run of the image id becomes one -200."""
    out = []
    for i in ids:
        if i == image_id and out and out[-1] == IMAGE_TOKEN_INDEX:
            continue
        if i == image_id:
            i = IMAGE_TOKEN_INDEX
        out.append(i)
    return out


def llava_min_prompt(tok, turns, system=None):
    """llava-min's ids of a prompt whose last human turn awaits its answer: encode_conversation with an
    empty last answer, cut where that answer starts (as chat.prompt_ids does for one turn)."""
    conversation = []
    for question, answer in turns:
        conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    ids, labels = encode_conversation(tok, conversation, max_length=1 << 20, system=system)
    # The empty answer's <|im_end|> is the last supervised token.
    last = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[:last]


def messages_of(turns, system=None, image=None):
    """transformers' chat messages of the turns; the first question's image as an image part."""
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    for k, (question, answer) in enumerate(turns):
        content = question
        if "<image>" in question:
            content = question.replace("<image>", "").strip()
        if k == 0 and image is not None:
            content = [{"type": "image", "image": image}, {"type": "text", "text": content}]
        messages.append({"role": "user", "content": content})
        if answer:
            messages.append({"role": "assistant", "content": answer})
    return messages


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    """A folder with the shapes data set (shapes/) and a tokenizer trained on it (tok.model)."""
    d = tmp_path_factory.mktemp("export")
    shapes = d / "shapes"
    run(["data/make_shapes.py", "--out", shapes, "--n-train", "16", "--n-test", "2",
         "--image-size", "28"])
    train_tokenizer([shapes / "finetune.json"], vocab_size=400, out=d / "tok.model", threads=1)
    return d


@pytest.fixture(scope="module")
def trained(shapes_data):
    """(llava-min folder, exported folder): finetune.py with LoRA on the shapes data, then the export
    command line (in this process: a fresh interpreter would only add torch's import time)."""
    d = shapes_data
    shapes = d / "shapes"
    run(["finetune.py", "--data", shapes / "finetune.json", "--image-folder", shapes,
         "--tokenizer", d / "tok.model", "--llm-config", "tiny", "--vit-config", "tiny",
         "--image-size", IMAGE_SIZE, "--max-length", "64", "--num-workers", "0", "--max-steps", "2",
         "--batch-size", "4", "--lora-r", "4", "--lr", "1e-3", "--train", "projector,llm",
         "--out", d / "model"])
    export_main(["--model", str(d / "model"), "--out", str(d / "model-hf"), "--dtype", "float32"])
    return d / "model", d / "model-hf"


TURNS = [
    [("<image>\nWhat shape is this?", "")],
    [("<image>\nHow many shapes are there?", "two"), ("And what colour are they?", "")],
    # the tag after the question: moved to the front, by data.py and by the template
    [("Describe it.<image>", "")],
]


def test_trained_model_loads_in_transformers_and_is_the_same_model(trained):
    model_dir, hf_dir = trained
    ours = LLaVA.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = Tokenizer(model_dir / "tokenizer.model")
    hf, processor = load_hf(hf_dir)
    image_id = hf.config.image_token_id
    pictures = images()
    cases = [(TURNS[0], None, image) for image in pictures]
    cases += [(TURNS[1], None, pictures[1]), (TURNS[2], "Be brief.", pictures[2])]
    for turns, system, image in cases:
        expected = llava_min_prompt(tok, turns, system)
        if len(turns) == 1:
            assert expected == prompt_ids(tok, "Describe it." if turns is TURNS[2] else
                                          turns[0][0].removeprefix("<image>\n"), True, system)
        messages = messages_of(turns, system, image)
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        rendered = processor(images=image, text=text, return_tensors="pt")
        direct = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        ids = rendered.input_ids[0].tolist()
        assert collapse(ids, image_id) == expected
        assert direct.input_ids.tolist() == rendered.input_ids.tolist()
        assert ids.count(image_id) == 4 and ids.count(tok.bos_id) == 1

        pixels = preprocess(image, IMAGE_SIZE, mode="pad")
        assert (rendered.pixel_values[0] - pixels).abs().max() < 1e-3
        with torch.no_grad():
            logits = ours(torch.tensor([expected]), pixels[None]).logits
            hf_logits = hf(**rendered).logits
        assert (logits - hf_logits).abs().max() < 1e-4

    # Greedy tokens and their text: to the stop ids, and 12 tokens past any stop (no_stop: no id)
    no_stop = hf.config.text_config.vocab_size
    lengths = []
    for turns, image in ((TURNS[0], pictures[0]), (TURNS[1], pictures[1]), (TURNS[2], pictures[3])):
        expected = torch.tensor([llava_min_prompt(tok, turns)])
        pixels = preprocess(image, IMAGE_SIZE, mode="pad")[None]
        prompt = processor.apply_chat_template(messages_of(turns, image=image),
                                               add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        start = inputs.input_ids.shape[1]
        for stops in (None, [no_stop]):
            new = ours.generate(expected, pixels, max_new_tokens=12, stop_ids=stops)[0].tolist()
            stop = {}
            if stops:
                stop = {"eos_token_id": stops}
            hf_new = hf.generate(**inputs, max_new_tokens=12, **stop)[0, start:].tolist()
            assert hf_new == new
            lengths.append(len(set(new)))
            # Text decodes alike; a run of byte pieces that is no UTF-8 is each byte's U+FFFD in
            # the fast tokenizer, where sentencepiece keeps the valid bytes.
            words = [t for t in new if t not in ours.config.stop_ids]
            if not any(tok.sp.is_byte(t) for t in words):
                assert processor.decode(words) == tok.decode(words)
    for text in ("The circle is red.", "  two spaces, a tab\t, ü 中 🙂"):
        assert processor.decode(tok.encode(text)) == text
    assert max(lengths) > 2


def test_text_only_and_several_images_give_the_same_logits(trained):
    model_dir, hf_dir = trained
    ours = LLaVA.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = Tokenizer(model_dir / "tokenizer.model")
    hf, processor = load_hf(hf_dir)
    image_id = hf.config.image_token_id

    text_only = processor.apply_chat_template(messages_of(TURNS[1]), add_generation_prompt=True,
                                              tokenize=True, return_dict=True, return_tensors="pt")
    plain = [(question.replace("<image>\n", ""), answer) for question, answer in TURNS[1]]
    expected = llava_min_prompt(tok, plain)
    assert text_only.input_ids[0].tolist() == expected
    with torch.no_grad():
        logits = ours(torch.tensor([expected])).logits
        assert (logits - hf(**text_only).logits).abs().max() < 1e-4

    # Three images in one message keep their places; the text is split at each, as data.py does.
    pictures = images()[:3]
    content = [{"type": "text", "text": "Compare "}, {"type": "image", "image": pictures[0]},
               {"type": "text", "text": "with "}, {"type": "image", "image": pictures[1]},
               {"type": "image", "image": pictures[2]}, {"type": "text", "text": "Which has more?"}]
    inputs = processor.apply_chat_template([{"role": "user", "content": content}],
                                           add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    prompt = ("<|im_start|>user\nCompare <image>\nwith <image>\n<image>\nWhich has more?"
              "<|im_end|>\n<|im_start|>assistant\n")
    expected = [tok.bos_id]
    for k, chunk in enumerate(prompt.split("<image>")):
        if k:
            expected.append(IMAGE_TOKEN_INDEX)
        expected += tok.encode(chunk)
    assert collapse(inputs.input_ids[0].tolist(), image_id) == expected
    pixels = torch.stack([preprocess(p, IMAGE_SIZE) for p in pictures])
    with torch.no_grad():
        logits = ours(torch.tensor([expected]), pixels).logits
        hf_logits = hf(**inputs).logits
    assert (logits - hf_logits).abs().max() < 1e-4


def test_exported_folder_contents(trained):
    model_dir, hf_dir = trained
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and "auto_map" not in config
    assert config["text_config"]["model_type"] == "llama"
    assert config["vision_config"]["model_type"] == "dinov2"
    assert config["vision_feature_select_strategy"] == "default"
    assert config["vision_feature_layer"] == -2
    tok = Tokenizer(model_dir / "tokenizer.model")
    # the first padding id of the tiny LLM
    assert config["image_token_index"] == tok.vocab_size
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.im_end_id, tok.eos_id]
    assert generation["suppress_tokens"] == list(range(tok.vocab_size, 2048))
    card = (hf_dir / "README.md").read_text()
    assert "LlavaForConditionalGeneration.from_pretrained" in card and "`--lora-r` | `4`" in card
    # finetune.py merged LoRA: the exported LLM holds the merged weights only
    assert not [k for k in load_file(hf_dir / "model.safetensors") if "lora" in k]


def test_crop_mode_pixels(trained, tmp_path):
    """A model trained with image_mode crop: the processor resizes the shortest edge and crops the
    centre as image.py does."""
    model_dir, _ = trained
    crop = tmp_path / "crop"
    shutil.copytree(model_dir, crop, ignore=shutil.ignore_patterns("checkpoints"))
    settings = json.loads((crop / "llava_config.json").read_text()) | {"image_mode": "crop"}
    (crop / "llava_config.json").write_text(json.dumps(settings))
    export(crop, tmp_path / "crop-hf")
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "crop-hf", backend="pil")
    for image in images():
        pixels = processor.image_processor(image, return_tensors="pt").pixel_values[0]
        assert (pixels - preprocess(image, IMAGE_SIZE, mode="crop")).abs().max() < 1e-3


# The CLIP and SigLIP towers: transformers' Llava does not interpolate their position embeddings,
# so the tiny presets run at their 56 px grid (4 x 4 patches)
TOWER_SIZE = 56


def assert_same_model(model_dir, hf_dir, mode):
    """llava-min's model and its export agree on several images: prompt ids, pixels within 1e-3 (in
    the trained image mode, with the tower's statistics), logits within 1e-4, greedy tokens."""
    ours = LLaVA.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = Tokenizer(model_dir / "tokenizer.model")
    hf, processor = load_hf(hf_dir)
    image_id = hf.config.image_token_id
    preprocessing = ours.vit.config.preprocessing
    tokens = ours.vit.config.image_tokens(TOWER_SIZE)
    for k, image in enumerate(images()):
        turns = TURNS[k % 2]
        expected = llava_min_prompt(tok, turns)
        prompt = processor.apply_chat_template(messages_of(turns, image=image),
                                               add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        ids = inputs.input_ids[0].tolist()
        assert collapse(ids, image_id) == expected
        assert ids.count(image_id) == tokens

        pixels = preprocess(image, TOWER_SIZE, mode=mode, preprocessing=preprocessing)
        assert (inputs.pixel_values[0] - pixels).abs().max() < 1e-3, (mode, k)
        with torch.no_grad():
            logits = ours(torch.tensor([expected]), pixels[None]).logits
            hf_logits = hf(**inputs).logits
        assert (logits - hf_logits).abs().max() < 1e-4, (mode, k)

        # Greedy: 12 tokens past any stop (no id stops them), so that every step is compared
        no_stop = [hf.config.text_config.vocab_size]
        new = ours.generate(torch.tensor([expected]), pixels[None], max_new_tokens=12,
                            stop_ids=no_stop)[0].tolist()
        start = inputs.input_ids.shape[1]
        hf_new = hf.generate(**inputs, max_new_tokens=12, eos_token_id=no_stop)[0, start:]
        assert hf_new.tolist() == new, (mode, k)


@pytest.mark.parametrize("preset", ["tiny-clip", "tiny-siglip"])
def test_clip_and_siglip_models_are_the_same_model_in_transformers(shapes_data, tmp_path, preset):
    """A model with each tower, saved by train.py after one step, exported in pad and crop modes (the
    tower's crop: CLIP's shortest edge and centre crop, SigLIP's plain resize to the square)."""
    shapes = shapes_data / "shapes"
    model = tmp_path / "model"
    run(["train.py", "--data", shapes / "pretrain.json", "--image-folder", shapes,
         "--tokenizer", shapes_data / "tok.model", "--llm-config", "tiny", "--vit-config", preset,
         "--image-size", TOWER_SIZE, "--max-length", "96", "--num-workers", "0", "--max-steps", "1",
         "--batch-size", "4", "--lr", "1e-2", "--out", model])
    vision_type = {"tiny-clip": "clip_vision_model", "tiny-siglip": "siglip_vision_model"}[preset]
    for mode in ("pad", "crop"):
        settings = json.loads((model / "llava_config.json").read_text()) | {"image_mode": mode}
        (model / "llava_config.json").write_text(json.dumps(settings))
        export(model, tmp_path / mode, dtype="float32")
        config = json.loads((tmp_path / mode / "config.json").read_text())
        assert config["vision_config"]["model_type"] == vision_type
        assert_same_model(model, tmp_path / mode, mode)


# Hand-made llava-min folders: the parts in the official formats, as train.py leaves them

@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A tokenizer from `python -m llava_min.tokenizer train` (300 pieces at most)."""
    d = tmp_path_factory.mktemp("tok")
    data = d / "data.json"
    sample = {"id": 1, "conversations": [{"from": "human", "value": "hello there"},
                                         {"from": "gpt", "value": "hi"}]}
    data.write_text(json.dumps([sample]))
    train_tokenizer([data], vocab_size=300, out=d / "tok.model", threads=1)
    return d / "tok.model"


def write_model(folder, llm_config, tokenizer, vit=None, llm_dtype=None, projector_depth=2):
    """llm/ (sharded InternLM2), vit/ (DINOv2 hub format), projector/ (XTuner), tokenizer.model and
    llava_config.json; returns the LLM's tensors."""
    folder = Path(folder)
    state = random_internlm2_state(llm_config)
    state = write_internlm2_checkpoint(folder / "llm", llm_config, state, dtype=llm_dtype)
    dinov2 = write_tiny_dinov2(folder / "vit", **(vit or {}))
    write_tiny_projector(folder / "projector", vision_hidden=dinov2.config.hidden_size,
                         llm_hidden=llm_config.hidden_size, depth=projector_depth, seed=1)
    shutil.copy(tokenizer, folder / "tokenizer.model")
    llava = {"select_layer": -2, "image_size": IMAGE_SIZE, "image_mode": "pad",
             "stop_ids": [92542, 2]}
    (folder / "llava_config.json").write_text(json.dumps(llava))
    return state


def tiny_llm(vocab_size, hidden=32):
    return InternLM2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256)


REAL_FORMAT = [
    "请描述这张图片中的内容，并说明颜色。",
    "```python\ndef f(x):\n    return {'a': [1, 2]}  # 注释\n```\nWhat does it do?",
    "spaces   and\ttabs\t\tand\n\n\nnewlines  ",
    "emoji 🙂👍🏽👨‍👩‍👧 🇫🇷 and ｆｕｌｌｗｉｄｔｈ ——…… 12345.678",
    "日本語と한국어 mixed with English, numbers 2024-06-01.",
]


def test_real_tokenizer_prompt_ids(real_tokenizer_path, tmp_path):
    """InternLM2's released tokenizer: the exported fast tokenizer gives llava-min's ids on
    real-format prompts; <image> takes the first reserved piece that holds no chat token
    ([UNUSED_TOKEN_0], 92397)."""
    write_model(tmp_path / "m", tiny_llm(92544, hidden=16), real_tokenizer_path)
    export(tmp_path / "m", tmp_path / "hf")
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    tok = Tokenizer(real_tokenizer_path)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["image_token_index"] == 92397
    image = images()[0]
    for k, question in enumerate(REAL_FORMAT):
        system = None
        if k % 2:
            system = "你是一个有帮助的助手。"
        turns = [(f"<image>\n{question}", "")]
        if k == 4:
            turns = [(f"<image>\n{question}", "好的。 Sure!"), (question[::-1], "")]
        text = processor.apply_chat_template(messages_of(turns, system, image),
                                             add_generation_prompt=True)
        inputs = processor(images=image, text=text)
        assert collapse(inputs["input_ids"][0], 92397) == llava_min_prompt(tok, turns, system)

        # Text only: rendered, then tokenized; or tokenized by apply_chat_template. One BOS.
        plain = [(q.replace("<image>\n", ""), a) for q, a in turns]
        expected = llava_min_prompt(tok, plain, system)
        messages = messages_of(plain, system)
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert processor.tokenizer(text).input_ids == expected, question
        direct = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                         tokenize=True, return_dict=False)
        assert direct == expected, question
        assert processor.tokenizer.decode(tok.encode(question)) == question


def test_bf16_frozen_llm_is_exported_bit_for_bit(tmp_path, small_tokenizer):
    """--dtype source keeps bf16: each LLM tensor is its source bit for bit, wqkv as the parity
    tests split it (_ckpt_internlm2.split_wqkv); the ViT keeps fp32; shards past max_shard_bytes."""
    config = tiny_llm(320)
    state = write_model(tmp_path / "m", config, small_tokenizer, llm_dtype=torch.bfloat16)
    export(tmp_path / "m", tmp_path / "hf", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    out = {}
    for name in shards:
        out.update(load_file(tmp_path / "hf" / name))
    llm = "model.language_model."
    assert torch.equal(out[llm + "embed_tokens.weight"], state["model.tok_embeddings.weight"])
    assert torch.equal(out["lm_head.weight"], state["output.weight"])
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        q, k, v = split_wqkv(state[layer + "attention.wqkv.weight"], 4, 2, config.head_dim)
        for name, t in (("q", q), ("k", k), ("v", v)):
            exported = out[f"{llm}layers.{i}.self_attn.{name}_proj.weight"]
            assert exported.dtype == torch.bfloat16 and torch.equal(exported, t)
        down = out[f"{llm}layers.{i}.mlp.down_proj.weight"]
        assert torch.equal(down, state[layer + "feed_forward.w2.weight"])
    assert out["model.vision_tower.embeddings.cls_token"].dtype == torch.float32
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["text_config"]["dtype"] == "bfloat16"
    assert config["vision_config"]["dtype"] == "float32"
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf",
                                                                    dtype=torch.float32)
    assert torch.equal(hf.lm_head.weight, state["output.weight"].float())

    export(tmp_path / "m", tmp_path / "fp32", dtype="float32")
    fp32 = load_file(tmp_path / "fp32" / "model.safetensors")
    assert fp32["lm_head.weight"].dtype == torch.float32


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_and_siglip_towers_load(tmp_path, small_tokenizer, kind):
    """transformers' vision-only CLIP / SigLIP saves in vit/: exported under Llava's names, every
    tensor found by LlavaForConditionalGeneration (llava-min's own towers are another file's)."""
    folder = tmp_path / kind
    write_model(folder, tiny_llm(512), small_tokenizer)
    shutil.rmtree(folder / "vit")
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=IMAGE_SIZE, patch_size=14)
    if kind == "clip":
        vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**sizes))
    else:
        vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**sizes))
    vision.save_pretrained(folder / "vit")
    export(folder, tmp_path / "hf")
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf",
                                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    strategy = {"clip": "default", "siglip": "full"}[kind]
    assert hf.config.vision_feature_select_strategy == strategy
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    inputs = processor(images=images()[0], text="<image>")
    assert inputs["input_ids"][0].count(hf.config.image_token_id) == 4


# Refusals: each names what transformers cannot express, and the way out

def test_refusals_of_what_llava_cannot_express(tmp_path, small_tokenizer):
    registers = tmp_path / "registers"
    write_model(registers, tiny_llm(512), small_tokenizer, vit=dict(registers=4))
    with pytest.raises(LlavaMinError, match=r"DINOv2 with 4 registers.*drops only the first "
                                            r"token.*Way out: train with a DINOv2 without registers"):
        export(registers, tmp_path / "out")

    deep = tmp_path / "deep"
    write_model(deep, tiny_llm(512), small_tokenizer, projector_depth=3)
    with pytest.raises(LlavaMinError, match=r"projector of depth 3.*exactly two Linear"):
        export(deep, tmp_path / "out")

    full = tmp_path / "full"
    n = Tokenizer(small_tokenizer).vocab_size
    write_model(full, tiny_llm(n), small_tokenizer)
    with pytest.raises(LlavaMinError, match=rf"no id is free for <image>.*\({n}\)"):
        export(full, tmp_path / "out")

    # a sentencepiece model with a dummy prefix (sentencepiece's default)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello there", "hi you"] * 50),
                                   model_writer=buf, model_type="bpe", vocab_size=300,
                                   byte_fallback=True, hard_vocab_limit=False,
                                   user_defined_symbols=list(CHAT_TOKENS), minloglevel=2)
    (tmp_path / "prefix.model").write_bytes(buf.getvalue())
    prefixed = tmp_path / "prefixed"
    write_model(prefixed, tiny_llm(512), tmp_path / "prefix.model")
    with pytest.raises(LlavaMinError, match=r"prefixed/tokenizer.model: this sentencepiece model "
                                            r"adds a dummy prefix"):
        export(prefixed, tmp_path / "out")

    narrow = tmp_path / "narrow"
    write_model(narrow, tiny_llm(512), small_tokenizer)
    shutil.rmtree(narrow / "vit")
    write_tiny_dinov2(narrow / "vit", hidden=48)
    with pytest.raises(LlavaMinError, match=r"the projector maps 32 -> 32, but the ViT width is 48"):
        export(narrow, tmp_path / "out")

    # a CLIP tower runs at its config's size only
    clip = tmp_path / "clip"
    write_model(clip, tiny_llm(512), small_tokenizer)
    shutil.rmtree(clip / "vit")
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=42, patch_size=14)
    transformers.CLIPVisionModel(vision).save_pretrained(clip / "vit")
    with pytest.raises(LlavaMinError, match=r"trained at image_size 28.*clip_vision_model runs at "
                                            r"its config's image_size 42 only"):
        export(clip, tmp_path / "out")


def test_refusals_of_wrong_folders(tmp_path, small_tokenizer):
    good = tmp_path / "good"
    write_model(good, tiny_llm(512), small_tokenizer)
    lora = tmp_path / "lora"
    shutil.copytree(good, lora)
    shard = lora / "llm" / "model-00001-of-00002.safetensors"
    adapter = "model.layers.0.attention.wqkv.lora_A.weight"
    save_file(load_file(shard) | {adapter: torch.zeros(4, 32)}, shard)
    index = json.loads((lora / "llm" / "model.safetensors.index.json").read_text())
    index["weight_map"][adapter] = shard.name
    (lora / "llm" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LlavaMinError, match=r"lora_A.*no Llava name.*merge LoRA into llm/"):
        export(lora, tmp_path / "out")

    with pytest.raises(LlavaMinError, match=r"no llava_config.json.*not a checkpoints/ step"):
        export(good / "llm", tmp_path / "out")

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(LlavaMinError, match=r"exists and is not an earlier export"):
        export(good, taken)
    assert (taken / "notes.txt").exists()
    with pytest.raises(LlavaMinError, match=r"lies in --model"):
        export(good, good / "hf")
    # an earlier export is replaced, and nothing is left beside it
    export(good, tmp_path / "again")
    export(good, tmp_path / "again")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
