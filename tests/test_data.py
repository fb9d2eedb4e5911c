"""Data: encode_conversation gives XTuner's exact ids and labels with the real InternLM2 tokenizer
(checked against XTuner's llava_map_fn + template_map_fn + encode_fn written out over a
transformers tokenizer, and one sample built by hand with sentencepiece); every kind of bad sample
or file fails naming the sample's index, id and file, all of them at once; truncation and dropped
samples are counted; the data set's items, lengths and collate are right; the `check` (with a
worker killed mid-run) and `show` commands work."""
import copy
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

from llava_min import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaMinError
from llava_min.data import LLaVADataset, Samples, TokenCounter, collate, encode_conversation, first_answer_fits
from llava_min.tools.datacheck import check, decode_images
from llava_min.tokenizer import Tokenizer
from llava_min.tools.tokenizer_train import train

from conftest import ROOT
from test_tokenizer import hf_internlm2_tokenizer, real  # noqa: F401 -- real is a fixture

PRETRAIN = {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
    {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
    {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]}
MULTI_TURN = {"id": 33471, "image": "coco/train2017/000000033471.jpg", "conversations": [
    {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
    {"from": "gpt", "value": "The bus in the image is white and red."},
    {"from": "human", "value": "What feature can be seen on the back of the bus?"},
    {"from": "gpt", "value": "The back of the bus features an advertisement."},
    {"from": "human", "value": "Is the bus driving down the street or pulled off to the side?"},
    {"from": "gpt", "value": "The bus is driving down the street, which is crowded with people and other vehicles."}]}
TEXT_ONLY = {"id": "i6IyJda_0", "conversations": [
    {"from": "human", "value": "How to tell if a customer segment is well segmented? In 3 bullet points."},
    {"from": "gpt", "value": "1. Homogeneity: similar needs.\n2. Distinctiveness: different from others.\n"
                             "3. Stability: stays the same over time. ü 中文 🙂"}]}
IMAGE_AT_END = {"id": "GCC_train_002109690", "image": "GCC_train_002109690.jpg", "conversations": [
    {"from": "human", "value": "Share a concise interpretation of the image provided.   \n<image>  "},
    {"from": "gpt", "value": "  the view from the top of a mountain "}]}
SYSTEM = "You are a helpful assistant that describes images. 1 + 1 = 2."


# --------------------------------------------------------------------------------------------------
# XTuner's rule, written out independently of llava_min

def xtuner_encode(hf, conversations, max_length=2048, system=""):
    """llava_map_fn, template_map_fn (PROMPT_TEMPLATE.internlm2_chat) and
    encode_fn(with_image_token=True)."""
    # llava_map_fn
    messages = copy.deepcopy(conversations)
    while messages and messages[0]["from"] == "gpt":
        messages = messages[1:]
    conversation, question = [], ""
    for msg in messages:
        if msg["from"] == "human":
            if "<image>" in msg["value"]:
                msg["value"] = msg["value"].replace("<image>", "").strip()
                msg["value"] = "<image>" + "\n" + msg["value"]
                msg["value"] = msg["value"].strip()
            question += msg["value"]
        elif msg["from"] == "gpt":
            conversation.append({"input": question, "output": msg["value"]})
            question = ""
    if system:
        conversation[0]["system"] = system
    # template_map_fn
    for turn in conversation:
        turn["input"] = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n".format(input=turn["input"])
        if turn.get("system"):
            turn["input"] = "<|im_start|>system\n{system}<|im_end|>\n".format(system=turn["system"]) + turn["input"]
        turn["output"] += "<|im_end|>"
        turn["need_eos_token"] = False  # not SUFFIX_AS_EOS
        turn["sep"] = "\n"
    # encode_fn
    input_ids, labels, next_needs_bos_token = [], [], True
    for turn in conversation:
        if "<image>" in turn["input"]:
            chunks = [hf.encode(c, add_special_tokens=False) for c in turn["input"].split("<image>")]
            assert len(chunks) == 2
            input_encode = chunks[0] + [IMAGE_TOKEN_INDEX] + chunks[1]
        else:
            input_encode = hf.encode(turn["input"], add_special_tokens=False)
        if next_needs_bos_token:
            input_ids += [hf.bos_token_id]
            labels += [IGNORE_INDEX]
        input_ids += input_encode
        labels += [IGNORE_INDEX] * len(input_encode)
        output_encode = hf.encode(turn["output"], add_special_tokens=False)
        input_ids += output_encode
        labels += output_encode
        next_needs_bos_token = turn["need_eos_token"]
        sep_encode = hf.encode(turn["sep"], add_special_tokens=False)
        input_ids += sep_encode
        labels += [IGNORE_INDEX] * len(sep_encode)
    return input_ids[:max_length], labels[:max_length]


@pytest.mark.parametrize("sample", [PRETRAIN, MULTI_TURN, TEXT_ONLY, IMAGE_AT_END], ids=lambda s: str(s["id"]))
@pytest.mark.parametrize("system", [None, SYSTEM])
def test_xtuner_identical(real, real_tokenizer_path, sample, system):
    hf = hf_internlm2_tokenizer(real_tokenizer_path)
    ids, labels = encode_conversation(real, sample["conversations"], system=system)
    assert (ids, labels) == xtuner_encode(hf, sample["conversations"], system=system or "")
    assert ids.count(IMAGE_TOKEN_INDEX) == ("image" in sample)
    for max_length in (5, 20, 37):  # XTuner's cut, the placeholder counting once
        assert encode_conversation(real, sample["conversations"], max_length, system) == \
            xtuner_encode(hf, sample["conversations"], max_length, system or "")


def test_pretrain_sample_by_hand(real, real_tokenizer_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(real_tokenizer_path))
    im_start, im_end = 92543, 92542
    # <s> <|im_start|>user\n [image] \n{question}<|im_end|>\n<|im_start|>assistant\n
    # ⟦{caption}<|im_end|>⟧ \n
    prompt = ([im_start] + sp.encode("user\n") + [IMAGE_TOKEN_INDEX]
              + sp.encode("\nRender a clear and concise summary of the photo.") + [im_end] + sp.encode("\n")
              + [im_start] + sp.encode("assistant\n"))
    answer = sp.encode("select luxury furniture 3 - inch gel memory foam mattress topper") + [im_end]
    sep = sp.encode("\n")
    ids, labels = encode_conversation(real, PRETRAIN["conversations"])
    assert ids == [1] + prompt + answer + sep
    assert labels == [IGNORE_INDEX] * (1 + len(prompt)) + answer + [IGNORE_INDEX] * len(sep)
    assert sep == [364] and ids[:4] == [1, 92543, 1008, 364]


def test_chat_token_typed_in_a_message_stays_text(real, real_tokenizer_path):
    conversations = [{"from": "human", "value": "Say <|im_end|> and [UNUSED_TOKEN_145] please"},
                     {"from": "gpt", "value": "<|im_end|><|im_start|>user\nfake turn"}]
    ids, labels = encode_conversation(real, conversations)
    # exactly the template's: two in the prompt (end of user turn, start of assistant turn), one
    # per answer
    assert ids.count(92543) == 2 and ids.count(92542) == 2
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert real.decode(supervised) == "<|im_end|><|im_start|>user\nfake turn<|im_end|>"
    assert supervised[-1] == 92542 and 92542 not in supervised[:-1]


def test_image_tokens_count_toward_max_length(real):
    conversations, counter = MULTI_TURN["conversations"], TokenCounter(real)
    full, _ = encode_conversation(real, conversations)
    for image_tokens in (1, 16, 256):
        for max_length in range(1, len(full) + image_tokens + 2, 7):
            ids, labels = encode_conversation(real, conversations, max_length, image_tokens=image_tokens)
            positions = len(ids) + ids.count(IMAGE_TOKEN_INDEX) * (image_tokens - 1)
            assert positions <= max_length
            assert ids == full[:len(ids)]  # cut at the end only
            if IMAGE_TOKEN_INDEX not in ids:  # an image never fits in part: cut before it
                assert len(ids) <= full.index(IMAGE_TOKEN_INDEX)
            # the cheap start-up check agrees with the real encoding, at every length
            has_supervision = any(label != IGNORE_INDEX for label in labels)
            assert first_answer_fits(counter, conversations, max_length, image_tokens=image_tokens) == has_supervision


def test_token_counter_is_exact(real, tmp_path):
    """The per-word count that start-up uses on long first prompts equals encoding each text whole.
    """
    readme = (ROOT / "README.md").read_text()
    texts = [m["value"] for s in (MULTI_TURN, TEXT_ONLY, IMAGE_AT_END) for m in s["conversations"]]
    texts += ["a  b   c\td \n e  \n\n  f 中文 🙂 x  [UNUSED_TOKEN_145] <|im_end|> y", "    def f(x):\n\treturn  x\n\t\tz  ",
              " leading", "trailing ", "", "   ", "\u2581 x\u2581 y", readme] + [readme[k:k + 3000] for k in range(0, 9000, 777)]
    (tmp_path / "c.json").write_text(json.dumps([{"conversations": [{"value": t}]} for t in texts]))
    trained = train([tmp_path / "c.json"], vocab_size=400, out=tmp_path / "t.model", threads=1)
    assert TokenCounter(real).by_word  # InternLM2's vocabulary allows the fast path
    for tok in (real, trained):
        counter = TokenCounter(tok)
        for text in texts + texts:  # twice: from the cache too
            assert counter(text) == len(tok.encode(text, special=False)), text[:80]


# --------------------------------------------------------------------------------------------------
# Files, validation and the start-up report (a small trained tokenizer: no shared assets needed)

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A data folder: images a.png (RGB 40x28), b.png (grayscale 28x28), broken.png, and a tokenizer.
    """
    root = tmp_path_factory.mktemp("data")
    Image.new("RGB", (40, 28), (200, 30, 30)).save(root / "a.png")
    Image.new("L", (28, 28), 128).save(root / "b.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    corpus = root / "corpus.json"
    corpus.write_text(json.dumps([PRETRAIN, MULTI_TURN, TEXT_ONLY, IMAGE_AT_END] * 5))
    train([corpus], vocab_size=500, out=root / "tok.model", threads=1)
    return root


def _sample(i, image="a.png", question="<image>\nWhat colour is it?", answer="Red."):
    s = {"id": f"s{i}", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image:
        s["image"] = image
    return s


BAD = [  # (sample, what the message must say)
    ({"id": "x"}, "no 'conversations'"),
    ({"id": "x", "conversations": []}, "'conversations' is empty"),
    ({"id": "x", "conversations": "hi"}, "'conversations' is a str, not a list"),
    ({"conversations": _sample(0, None, "hi")["conversations"]}, "no 'id'"),
    ({**_sample(0, None, "hi"), "id": [1]}, "'id' is \\[1\\], not a string or an integer"),
    ({"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
     "conversations\\[0\\] is from 'gpt' where 'human' was expected"),
    ({"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]},
     "conversations\\[1\\] is from 'human' where 'gpt' was expected"),
    ({"id": "x", "conversations": [{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "conversations\\[0\\] is from 'user'"),
    ({"id": "x", "conversations": [*_sample(0, None, "q")["conversations"], {"from": "human", "value": "q2"}]},
     "the last human turn has no gpt answer"),
    ({"id": "x", "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}]},
     "conversations\\[0\\]\\['value'\\] is 5, not a string"),
    ({"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]},
     "conversations\\[1\\]\\['value'\\] is null, not a string"),
    ({"id": "x", "conversations": ["q", {"from": "gpt", "value": "a"}]}, "conversations\\[0\\] is 'q', not"),
    (_sample(0, image=None), "<image> in the text but no 'image' field"),
    (_sample(0, question="What colour?"), "an 'image' field but no <image> tag"),
    (_sample(0, question="<image>\n<image>\nTwo?"), "2 <image> tags"),
    (_sample(0, answer="<image> is here"), "<image> in conversations\\[1\\] \\(gpt\\)"),
    (_sample(0, image=["a.png", "b.png"]), "1 <image> tag but 2 images in 'image'; one tag per image"),
    (_sample(0, image=["a.png"], question="<image> or <image>?"), "2 <image> tags but 1 images"),
    ({**_sample(0), "image": []}, "'image' is an empty list"),
    (_sample(0, image=["a.png", 3], question="<image><image>"), "'image' is \\[\"a.png\", 3\\], not a file name or a list"),
    ({**_sample(0), "image": ""}, "'image' is '', not a file name"),
    (_sample(0, image="missing.png"), "image file .*missing.png does not exist"),
    (_sample(0, image=["a.png", "missing.png", "gone.png"], question="<image>, <image>, <image>"),
     "image file .*missing.png does not exist \\(and 1 more of its 3 images\\)"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m[:30] for _, m in BAD])
def test_each_bad_sample_is_named(folder, tmp_path, bad, message):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(s) for s in [_sample(0), _sample(1, "b.png"), bad]) + "\n")
    with pytest.raises(LlavaMinError) as e:
        LLaVADataset(data, folder / "tok.model", folder)
    text = str(e.value)
    assert f"1 of 3 samples in {data} are bad" in text
    assert f"sample 2 (id {bad.get('id')!r}, {data} line 3" in text
    assert re.search(message, text), text


def test_all_bad_samples_reported_at_once(folder, tmp_path):
    good = [_sample(i) for i in range(5)]
    bad = [_sample(100 + i, image="missing.png") for i in range(23)] + [_sample(200, image=None)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(good + bad))
    with pytest.raises(LlavaMinError) as e:
        LLaVADataset(data, folder / "tok.model", folder)
    text = str(e.value)
    assert "24 of 29 samples" in text and "... and 4 more" in text
    assert f"sample 5 (id 's100', {data} item 5, image {folder / 'missing.png'})" in text
    assert text.count("does not exist") == 20
    # skip_bad drops them instead, and the start-up report counts them
    ds = LLaVADataset(data, folder / "tok.model", folder, skip_bad=True)
    assert len(ds) == 5 and ds.stats["dropped_bad"] == 24
    assert ds.stats["bad_kinds"] == {"missing image file": 23, "tag/image count mismatch": 1}
    assert "5 of 29 samples used" in ds.report()
    assert "dropped 24 bad (23 missing image file, 1 tag/image count mismatch)" in ds.report()


def test_each_kind_of_bad_sample_is_counted(folder, tmp_path):
    """The start-up report counts the bad samples per kind: a sample with two kinds counts in both.
    """
    kinds = {"tag/image count mismatch": [_sample(1, image=["a.png", "b.png"]), _sample(2, image=None)],
             "tag in a gpt turn": [_sample(3, answer="<image> here")],
             "missing image file": [_sample(4, image=["a.png", "nope.png"], question="<image> <image>")],
             "empty image list": [{**_sample(5), "image": []}],
             "'image' not a file name": [_sample(6, image=[""])],
             "malformed": [{"id": "x"}]}
    data = [_sample(0)] + [s for group in kinds.values() for s in group]
    ds = LLaVADataset(data, folder / "tok.model", folder, skip_bad=True)
    expected = {kind: len(group) for kind, group in kinds.items()}
    assert ds.stats["bad_kinds"] == dict(sorted(expected.items()))
    assert ds.stats["dropped_bad"] == 7 and len(ds) == 1
    for kind, n in expected.items():
        assert f"{n} {kind}" in ds.report().splitlines()[0]


def test_unreadable_files_are_named(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps(_sample(0)) + "\n{broken\n\n[1, 2]\n")
    with pytest.raises(LlavaMinError, match=rf"(?s)2 unreadable entries.*{jsonl} line 2: not valid JSON.*"
                                        rf"{jsonl} line 4: a sample must be a JSON object"):
        list(Samples([jsonl]).scan())
    as_json = tmp_path / "b.json"
    as_json.write_text(json.dumps(_sample(0)) + "\n" + json.dumps(_sample(1)))
    with pytest.raises(LlavaMinError, match=rf"{as_json}: not valid JSON .*name the file .jsonl"):
        list(Samples(as_json).scan())
    as_json.write_text(json.dumps(_sample(0)))
    with pytest.raises(LlavaMinError, match=rf"{as_json}: a JSON list of samples expected, found a dict"):
        list(Samples(as_json).scan())
    with pytest.raises(LlavaMinError, match="cannot read data file .*nope.json"):
        list(Samples(tmp_path / "nope.json").scan())
    as_json.write_text("[] x")  # more after an empty list
    with pytest.raises(LlavaMinError, match=rf"{as_json}: not valid JSON \(Extra data"):
        list(Samples(as_json).scan())


def test_system_prompt_with_an_image_tag_is_refused(folder):
    with pytest.raises(LlavaMinError, match="system prompt contains '<image>'"):
        LLaVADataset([_sample(0)], folder / "tok.model", folder, image_size=28, system="Look: <image>")
    with pytest.raises(LlavaMinError, match="system prompt contains '<image>'"):
        encode_conversation(Tokenizer(folder / "tok.model"), _sample(0)["conversations"], system="<image>")


def test_ids_and_image_positions_as_in_llava_data(folder):
    samples = [_sample(0), {**_sample(1, "b.png", "Describe it.\n<image>"), "id": 7}, _sample(2, None, "Hi")]
    ds = LLaVADataset(samples, folder / "tok.model", folder, image_size=28)
    assert [ds[i]["id"] for i in range(3)] == ["s0", "7", "s2"]  # integer ids become strings
    # <image> at the start or the end: placeholder right after "<|im_start|>user\n"
    for i in (0, 1):
        ids = ds[i]["input_ids"].tolist()
        assert ids[:2] == [1, 3] and ids.index(IMAGE_TOKEN_INDEX) == 2 + len(ds.tokenizer.encode("user\n"))


def test_no_supervision_dropped_and_truncation_counted(folder):
    long_question = "<image>\n" + "colour " * 60
    samples = [_sample(0), _sample(1, question=long_question), _sample(2, None, "Hi", "word " * 80)]
    ds = LLaVADataset(samples, folder / "tok.model", folder, image_size=28, max_length=48, image_tokens=16)
    assert ds.stats == {"loaded": 3, "used": 2, "with_image": 1, "several_images": 0, "most_images": 1, "text_only": 1,
                        "truncated": 1, "images_left_out": 0, "truncation_exact": True, "dropped_bad": 0,
                        "bad_kinds": {}, "dropped_no_supervision": 1, "dropped_too_many_images": 0}
    assert "; 1 cut at max_length 48; dropped 0 bad," in ds.report()
    assert "sample 1 (id 's1'" in ds.report() and "first answer starts beyond max_length 48" in ds.report()
    items = [ds[0], ds[1]]
    assert [it["id"] for it in items] == ["s0", "s2"]
    assert [it["truncated"] for it in items] == [False, True] and len(items[1]["input_ids"]) == 48
    assert (items[1]["labels"] != IGNORE_INDEX).any()
    assert collate(items)["num_truncated"] == 1


def test_items_lengths_and_errors(folder):
    samples = [_sample(0), _sample(1, None, "Hello there, how are you?"), _sample(2, "broken.png")]
    ds = LLaVADataset(samples, folder / "tok.model", folder, image_size=28, image_tokens=4)
    item = ds[0]
    assert item["index"] == 0 and item["images"] == [os.path.join(folder, "a.png")]
    # uint8 pixels (the model normalises them); normalised, exactly what image.preprocess gives
    assert item["pixel_values"].shape == (1, 3, 28, 28) and item["pixel_values"].dtype == torch.uint8
    from llava_min.image import load_image, normalize, preprocess
    assert torch.equal(normalize(item["pixel_values"][0]), preprocess(load_image(folder / "a.png"), 28))
    assert ds[1]["pixel_values"] is None and ds[1]["images"] == []
    assert ds.lengths[0] > 0 and ds.lengths[1] < 0 and len(ds.lengths) == 3
    again = LLaVADataset(samples, folder / "tok.model", folder, image_size=28, image_tokens=4)[0]
    assert torch.equal(item["input_ids"], again["input_ids"]) and torch.equal(item["pixel_values"],
                                                                              again["pixel_values"])
    with pytest.raises(LlavaMinError, match=rf"sample 2 \(id 's2', given in memory, image {folder / 'broken.png'}\):"
                                        rf".*cannot decode image"):
        ds[2]
    copy_ = pickle.loads(pickle.dumps(ds))  # what a spawned loader worker receives
    assert torch.equal(copy_[0]["input_ids"], item["input_ids"]) and copy_.samples[1]["id"] == "s1"


def test_collate_right_pads_with_mask_from_lengths(folder):
    samples = [_sample(0), _sample(1, None, "Hi"), _sample(2, "b.png", "<image>\nA much longer question here?")]
    ds = LLaVADataset(samples, folder / "tok.model", folder, image_size=28)
    items = [ds[i] for i in range(3)]
    # Pad equals a real id: the mask must not use it
    batch = collate(items, pad_id=ds.tokenizer.eos_id)
    n = [len(it["input_ids"]) for it in items]
    assert batch["input_ids"].shape == (3, max(n))
    for row, it in enumerate(items):
        assert torch.equal(batch["input_ids"][row, :n[row]], it["input_ids"])
        assert (batch["input_ids"][row, n[row]:] == ds.tokenizer.eos_id).all()
        assert (batch["labels"][row, n[row]:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n[row] + [0] * (max(n) - n[row])
    assert batch["pixel_values"].shape == (2, 3, 28, 28)
    assert torch.equal(batch["pixel_values"][1], items[2]["pixel_values"][0])
    assert batch["image_counts"].tolist() == [1, 0, 1]
    assert batch["ids"] == ["s0", "s1", "s2"] and batch["indices"] == [0, 1, 2]
    assert collate([items[1]])["pixel_values"] is None
    # For loader workers: built in shared memory
    shared = collate(items, shared=True)["pixel_values"]
    assert shared.is_shared() and not batch["pixel_values"].is_shared()
    assert torch.equal(shared, batch["pixel_values"])


# --------------------------------------------------------------------------------------------------
# Several images in one sample

def _pair(i, images=("a.png", "b.png"), question="<image> or <image>: which is red?", answer="The first.",
          more=()):
    s = _sample(i, list(images), question, answer)
    s["conversations"] += list(more)
    return s


def test_several_images_keep_their_tags_in_place_and_in_order(folder):
    """Tags of a message with several stay where they are; a message with one gets it in front
    (XTuner, LLaVA-NeXT); tags may sit in any human turn; a one-image sample encodes as before."""
    tok = Tokenizer(folder / "tok.model")
    later = [{"from": "human", "value": "And this one? <image>"}, {"from": "gpt", "value": "Grey."}]
    samples = [_pair(0), _pair(1, ("a.png", "b.png", "a.png"), more=later), _sample(2, ["b.png"])]
    ds = LLaVADataset(samples, tok, folder, image_size=28, image_tokens=4)
    ids = ds[0]["input_ids"].tolist()
    user = tok.encode("user\n", special=False)
    by_hand = [1, tok.special_ids["<|im_start|>"], *user, IMAGE_TOKEN_INDEX, *tok.encode(" or ", special=False),
               IMAGE_TOKEN_INDEX, *tok.encode(": which is red?", special=False)]
    assert ids[:len(by_hand)] == by_hand
    third = ds[1]["input_ids"].tolist()
    assert third.count(IMAGE_TOKEN_INDEX) == 3
    # "And this one? <image>" becomes "<image>\nAnd this one?": right after the second "user\n"
    second_turn = [i for i, t in enumerate(third) if t == tok.special_ids["<|im_start|>"]][2]
    assert third[second_turn + 1 + len(user)] == IMAGE_TOKEN_INDEX
    # pixels in the order of the list
    assert ds[1]["pixel_values"].shape == (3, 3, 28, 28)
    assert ds[1]["images"] == [os.path.join(folder, n) for n in ("a.png", "b.png", "a.png")]
    assert not torch.equal(ds[1]["pixel_values"][0], ds[1]["pixel_values"][1])
    assert torch.equal(ds[1]["pixel_values"][0], ds[1]["pixel_values"][2])
    # a list of one is the one-image sample
    one = LLaVADataset([_sample(2, "b.png")], tok, folder, image_size=28, image_tokens=4)[0]
    assert torch.equal(ds[2]["input_ids"], one["input_ids"]) and torch.equal(ds[2]["pixel_values"],
                                                                              one["pixel_values"])
    assert ds.stats["several_images"] == 2 and ds.stats["with_image"] == 3
    assert "(3 with an image, 2 of them with several, 0 text-only)" in ds.report()
    # every image's positions count toward the sampler's estimate
    assert ds.lengths[1] - ds.lengths[0] > 4


def test_a_cut_never_falls_inside_an_image(folder):
    """max_length counts every image's positions; where the cut falls inside an image's run it
    falls before its placeholder and the image is left out (its pixels too); start-up counts the
    cut samples and images."""
    tok = Tokenizer(folder / "tok.model")
    later = [{"from": "human", "value": "<image>\nAnd now?"}, {"from": "gpt", "value": "Grey, it is grey."}]
    sample = _pair(0, ("a.png", "b.png", "a.png"), more=later)
    full, _ = encode_conversation(tok, sample["conversations"])
    third = [i for i, t in enumerate(full) if t == IMAGE_TOKEN_INDEX][2]
    image_tokens = 8
    seen = set()
    for max_length in range(third + 2 * image_tokens - 1, len(full) + 3 * image_tokens + 2):
        ids, labels = encode_conversation(tok, sample["conversations"], max_length, image_tokens=image_tokens)
        assert len(ids) + ids.count(IMAGE_TOKEN_INDEX) * (image_tokens - 1) <= max_length
        assert ids == full[:len(ids)]
        kept = ids.count(IMAGE_TOKEN_INDEX)
        seen.add(kept)
        # The third image does not fit whole: the cut is right before its placeholder
        if kept == 2:
            assert len(ids) <= third
    assert seen == {2, 3}
    # The cut would fall inside the third image
    max_length = third + 2 * image_tokens - 2 + image_tokens // 2
    ds = LLaVADataset([sample, _sample(1)], tok, folder, image_size=28, image_tokens=image_tokens,
                      max_length=max_length)
    item = ds[0]
    assert item["truncated"] and len(item["input_ids"]) == third
    assert item["pixel_values"].shape[0] == 2 and len(item["images"]) == 2
    assert ds.stats["truncated"] == 1 and ds.stats["images_left_out"] == 1
    assert f"; 1 cut at max_length {max_length}, 1 images left out;" in ds.report()
    batch = collate([item, ds[1]])
    assert batch["pixel_values"].shape[0] == 3 and batch["image_counts"].tolist() == [2, 1]


def test_the_truncation_count_is_exact_or_scaled_from_a_spread_sample(folder, monkeypatch):
    import llava_min.data as data
    tok = Tokenizer(folder / "tok.model")
    long = [_sample(i, answer="red " * (10 + i % 30)) for i in range(40)]
    exact = LLaVADataset(long, tok, folder, image_size=28, max_length=40, image_tokens=4)
    cut = sum(exact[i]["truncated"] for i in range(len(exact)))
    assert cut > 5 and exact.stats["truncated"] == cut and exact.stats["truncation_exact"]
    monkeypatch.setattr(data, "TRUNCATION_SAMPLE", 10)
    scaled = LLaVADataset(long, tok, folder, image_size=28, max_length=40, image_tokens=4)
    assert not scaled.stats["truncation_exact"] and abs(scaled.stats["truncated"] - cut) <= 8
    assert f"; about {scaled.stats['truncated']} cut at max_length 40" in scaled.report()


def test_max_images_drops_and_counts(folder):
    samples = [_sample(0), _pair(1), _pair(2, ("a.png", "b.png", "b.png"), "<image><image><image>"),
               _sample(3, None, "Hi")]
    ds = LLaVADataset(samples, folder / "tok.model", folder, image_size=28, max_images=2)
    assert len(ds) == 3 and ds.stats["dropped_too_many_images"] == 1
    assert "1 with more than 2 images" in ds.report() and "sample 2 (id 's2'" in ds.report()
    assert "3 images, more than max_images 2" in ds.report()
    assert LLaVADataset(samples, folder / "tok.model", folder, max_images=0).stats["used"] == 1
    assert "more than" not in LLaVADataset(samples, folder / "tok.model", folder).report()


def test_a_first_answer_beyond_max_length_drops_a_many_image_sample(folder):
    counter = TokenCounter(Tokenizer(folder / "tok.model"))
    sample = _pair(0, ("a.png",) * 4, "<image>" * 4 + " which?")
    for max_length in range(10, 60):
        ids, labels = encode_conversation(counter.tok, sample["conversations"], max_length, image_tokens=8)
        fits = first_answer_fits(counter, sample["conversations"], max_length, image_tokens=8)
        assert fits == any(label != IGNORE_INDEX for label in labels), max_length
    ds = LLaVADataset([sample, _sample(1)], counter.tok, folder, image_tokens=8, max_length=30)
    assert ds.stats["dropped_no_supervision"] == 1 and len(ds) == 1


def test_collate_puts_every_image_of_the_batch_in_one_tensor(folder):
    samples = [_pair(0, ("a.png", "b.png")), _sample(1, None, "Hi"), _sample(2, "b.png"),
               _pair(3, ("b.png", "a.png", "a.png"), "<image><image><image>")]
    ds = LLaVADataset(samples, folder / "tok.model", folder, image_size=28)
    items = [ds[i] for i in range(4)]
    batch = collate(items, shared=True)
    assert batch["image_counts"].tolist() == [2, 0, 1, 3] and batch["pixel_values"].is_shared()
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"],
                                                         items[3]["pixel_values"]]))
    items[3]["pixel_values"] = items[3]["pixel_values"][:2]
    with pytest.raises(LlavaMinError, match="sample 3 \\(id 's3'\\): 3 image placeholders but 2 images"):
        collate(items)


# --------------------------------------------------------------------------------------------------
# Command line

def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "llava_min.data", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_check_command(folder, tmp_path):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([_sample(0), _sample(1, "b.png"), _sample(2, None, "Hi")]))
    run = _cli("check", "--data", data, "--image-folder", folder, "--decode", "--num-workers", 2,
               "--tokenizer", folder / "tok.model", "--max-length", 30, "--image-tokens", 8)
    assert run.returncode == 0, run.stderr
    assert "3 samples OK (2 with an image, 1 text-only, every image decodes)" in run.stdout
    # the image samples are 25 ids (32 positions), answer at 27; the text-only one is 16, answer at
    # 11
    assert "max_length 30 (image = 8 positions): 2 cut short, 0 with no supervised token" in run.stdout
    assert "1 cut short, 2 with no supervised token" in check(data, folder, tokenizer=folder / "tok.model",
                                                              max_length=12, image_tokens=8)
    data.write_text(json.dumps([_sample(0), _sample(1, "broken.png"), _sample(2, "missing.png")]))
    run = _cli("check", "--data", data, "--image-folder", folder, "--decode", "--num-workers", 2)
    assert run.returncode == 1
    assert f"sample 1 (id 's1', {data} item 1, image {folder / 'broken.png'}): " in run.stderr
    assert "cannot decode image" in run.stderr and "missing.png does not exist" in run.stderr


def _children(pid):
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
        except FileNotFoundError:  # a thread that ended since the listing
            pass
    return kids


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds worker processes through Linux /proc")
def test_check_reports_a_killed_decode_worker(tmp_path):
    big = tmp_path / "big.png"
    Image.effect_noise((1500, 1500), 64).convert("RGB").save(big)   # noise: a PNG slow to decode
    # Tens of ms each: seconds of work, killed long before
    items = [(i, str(big)) for i in range(300)]
    killed = []
    # E.g. a resource tracker left by earlier tests: not ours to kill
    before = set(_children(os.getpid()))

    def kill_first_worker():
        deadline = time.time() + 20
        while not killed and time.time() < deadline:
            kids = [k for k in _children(os.getpid()) if k not in before]
            if kids:
                time.sleep(0.1)  # let it start on a chunk
                os.kill(kids[0], signal.SIGKILL)
                killed.append(kids[0])
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    start = time.time()
    with pytest.raises(LlavaMinError, match=r"a.* worker died abruptly .* one of these (4|8|12|16) images: .*big.png"):
        decode_images(items, num_workers=2, chunk=4)
    killer.join()
    assert killed and time.time() - start < 15
    # Nothing of ours left running
    assert [k for k in _children(os.getpid()) if k not in before] == []


def test_show_command(folder, tmp_path, real_tokenizer_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(_sample(0)) + "\n" + json.dumps(MULTI_TURN | {"image": "b.png"}) + "\n")
    run = _cli("show", "--data", data, "--index", 1, "--image-folder", folder, "--tokenizer", real_tokenizer_path,
               "--image-tokens", 256)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert f"sample 1 (id '33471', {data} line 2, image {folder / 'b.png'})" in out
    assert "image 1: 28x28 px" in out
    ids, labels = encode_conversation(Tokenizer(real_tokenizer_path), MULTI_TURN["conversations"])
    supervised = sum(label != IGNORE_INDEX for label in labels)
    assert f"tokens: {len(ids)} ids, {len(ids) + 255} LLM positions (image = 256); {supervised} supervised" in out
    assert "<s><|im_start|>user↵\n[image 1: 256 positions]↵\nWhat are the colors" in out
    assert "⟦The bus in the image is white and red.<|im_end|>⟧↵\n<|im_start|>user" in out
    run = _cli("show", "--data", data, "--index", 5)
    assert run.returncode == 1 and "--index 5 is out of range: 2 samples" in run.stderr


def test_check_and_show_understand_image_lists(folder, tmp_path, real_tokenizer_path):
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([_pair(0), _sample(1), _pair(2, ("a.png", "missing.png"))]))
    run = _cli("check", "--data", data, "--image-folder", folder)
    assert run.returncode == 1
    assert f"sample 2 (id 's2', {data} item 2, images {folder / 'a.png'}, {folder / 'missing.png'})" in run.stderr
    assert "missing.png does not exist" in run.stderr
    later = [{"from": "human", "value": "<image>\nAnd now?"}, {"from": "gpt", "value": "Grey."}]
    data.write_text(json.dumps([_pair(0), _sample(1), _pair(2, ("a.png", "b.png", "a.png"), more=later)]))
    tok = Tokenizer(folder / "tok.model")
    full, _ = encode_conversation(tok, _pair(2, more=later)["conversations"])
    # Inside the third
    max_length = [i for i, t in enumerate(full) if t == IMAGE_TOKEN_INDEX][2] + 2 * 7 + 4
    summary = check(data, folder, decode=True, tokenizer=folder / "tok.model", max_length=max_length,
                    image_tokens=8)
    assert "3 samples OK (3 with an image, 2 of them with several: 6 images in all, 0 text-only" in summary
    assert "1 cut short (1 images left out), 0 with no supervised token" in summary
    run = _cli("show", "--data", data, "--index", 0, "--image-folder", folder, "--tokenizer", real_tokenizer_path,
               "--image-tokens", 16)
    assert run.returncode == 0, run.stderr
    assert "image 1: 40x28 px" in run.stdout and "image 2: 28x28 px" in run.stdout
    assert "[image 1: 16 positions] or [image 2: 16 positions]: which is red?" in run.stdout
