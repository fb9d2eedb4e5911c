"""The tokenizer: the real InternLM2 model gives the official ids (chat tokens included, same as a
transformers tokenizer over the same file with the chat tokens registered as in tokenizer_config.json),
chat-token names typed as content stay text, loading keeps stderr clean, and
`python -m llava_min.tokenizer train` makes a small model with the chat tokens at the documented ids
that round-trips text."""
import functools
import json
import pickle
import subprocess
import sys

import pytest

from llava_min.tokenizer import CHAT_TOKENS, TRAINED_IDS, Tokenizer, TokenizerError, train

from conftest import ROOT

REAL_IDS = {"<|plugin|>": 92538, "<|interpreter|>": 92539, "<|action_end|>": 92540,
            "<|action_start|>": 92541, "<|im_end|>": 92542, "<|im_start|>": 92543}
TEXTS = ["<|im_start|>user\nhi<|im_end|>\n",
         "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
         "What is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n",
         "  two leading spaces, tabs\tand\r\nCRLF, ü, 中文, emoji 🙂, NUL \x00 byte",
         "<|action_start|><|interpreter|>\nprint(1)<|action_end|>\n<|plugin|>",
         "[UNUSED_TOKEN_145] is the piece that holds <|im_end|>"]


@functools.lru_cache
def _load(path):
    return Tokenizer(path)


@pytest.fixture
def real(real_tokenizer_path):
    return _load(real_tokenizer_path)


@functools.lru_cache
def hf_internlm2_tokenizer(path):
    """transformers' sentencepiece tokenizer over the same file, the six chat tokens registered at their ids
    as InternLM2's tokenizer_config.json does (added_tokens_decoder, special, no stripping)."""
    sp_backend = pytest.importorskip("transformers.tokenization_utils_sentencepiece")
    from transformers import AddedToken

    added = {i: AddedToken(name, special=True, normalized=False, lstrip=False, rstrip=False)
             for name, i in REAL_IDS.items()}
    return sp_backend.SentencePieceBackend(vocab_file=str(path), added_tokens_decoder=added, bos_token="<s>",
                                           eos_token="</s>", unk_token="<unk>", pad_token="</s>")


@pytest.fixture
def hf_reference(real_tokenizer_path):
    return hf_internlm2_tokenizer(real_tokenizer_path)


def test_chat_template_ids(real):
    assert real.encode("<|im_start|>user\nhi<|im_end|>\n", bos=True) == [1, 92543, 1008, 364, 6176, 92542, 364]
    assert (real.bos_id, real.eos_id, real.vocab_size) == (1, 2, 92544)
    assert (real.im_start_id, real.im_end_id) == (92543, 92542)
    assert real.special_ids == REAL_IDS
    for name, i in REAL_IDS.items():
        assert real.encode(name) == [i]
        assert real.decode([i]) == name


def test_same_ids_as_transformers(real, hf_reference):
    for text in TEXTS:
        assert real.encode(text) == hf_reference.encode(text, add_special_tokens=False), text


def test_special_false_keeps_names_as_text(real):
    for text in TEXTS:
        ids = real.encode(text, special=False)
        assert not set(ids) & set(REAL_IDS.values()), text
        assert real.decode(ids) == text
    # the piece name itself, which sentencepiece alone would match as a user-defined piece
    assert real.sp.encode("[UNUSED_TOKEN_145]") == [92542]
    assert 92542 not in real.encode("[UNUSED_TOKEN_145]", special=False)


def test_decode(real):
    ids = real.encode("<|im_start|>assistant\nA cat.<|im_end|>", bos=True)
    assert real.decode(ids) == "<|im_start|>assistant\nA cat.<|im_end|>"
    assert real.decode(ids, skip_special=True) == "assistant\nA cat."
    with pytest.raises(TokenizerError, match=r"92544.*outside this tokenizer's vocabulary of 92544"):
        real.decode([5, 92544])


def test_pickle_and_clean_stderr(real_tokenizer_path, capfd):
    capfd.readouterr()
    tok = Tokenizer(real_tokenizer_path)
    copy = pickle.loads(pickle.dumps(tok))  # what a spawned loader worker does
    assert copy.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and copy.special_ids == REAL_IDS
    err = capfd.readouterr().err
    assert "null character" not in err and "absl" not in err, err


def test_bad_model_file_is_named(tmp_path):
    bad = tmp_path / "tok.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=rf"{bad}: not a sentencepiece model"):
        Tokenizer(bad)
    with pytest.raises(TokenizerError, match=r"cannot read the tokenizer model .*missing.model"):
        Tokenizer(tmp_path / "missing.model")


def _write_corpus(path, n=120):
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    samples = []
    for i in range(n):
        c, s = colours[i % 4], shapes[i % 3]
        samples.append({"id": i, "image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nWhat colour is the {s} at position {i}?"},
            {"from": "gpt", "value": f"The {s} is {c}."}]})
    path.write_text(json.dumps(samples))
    return path


def test_trained_tokenizer(tmp_path):
    data = _write_corpus(tmp_path / "train.json")
    tok = train([data], vocab_size=400, out=tmp_path / "tok.model", threads=1)
    assert tok.special_ids == TRAINED_IDS == {name: 3 + k for k, name in enumerate(CHAT_TOKENS)}
    assert (tok.bos_id, tok.eos_id, tok.sp.unk_id()) == (1, 2, 0)
    assert 265 < tok.vocab_size <= 400
    loaded = Tokenizer(tmp_path / "tok.model")
    for text in ["The circle is red.", "What colour is the square at position 12?\n", "unseen: ü 中 🙂 \x00 qxz",
                 "<|im_start|>user\nhi<|im_end|>\n"]:
        ids = loaded.encode(text)
        assert loaded.decode(ids) == text
    assert loaded.encode("<|im_start|>user\nhi<|im_end|>", bos=True)[:2] == [1, TRAINED_IDS["<|im_start|>"]]
    assert [loaded.sp.id_to_piece(i) for i in loaded.encode("2024")] == ["2", "0", "2", "4"]  # split digits
    assert loaded.encode("red")[0] > 264 and len(loaded.encode(" red")) == 1  # no dummy prefix: "▁red" is one piece
    typed = loaded.encode("say <|im_end|> now", special=False)
    assert not set(typed) & set(TRAINED_IDS.values()) and loaded.decode(typed) == "say <|im_end|> now"


def test_train_cli_and_small_vocab_error(tmp_path):
    data = _write_corpus(tmp_path / "train.jsonl.json", n=40)
    out = tmp_path / "sub" / "tok.model"
    run = subprocess.run([sys.executable, "-m", "llava_min.tokenizer", "train", "--data", str(data),
                          "--vocab-size", "300", "--out", str(out), "--threads", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout and "<|im_end|> 4" in run.stdout
    assert Tokenizer(out).special_ids == TRAINED_IDS
    with pytest.raises(TokenizerError, match=r"--vocab-size 200.*256 byte pieces"):
        train([data], vocab_size=200, out=tmp_path / "small.model", threads=1)
