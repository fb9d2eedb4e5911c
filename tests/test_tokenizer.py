"""The tokenizer: the real InternLM2 model gives the ids of InternLM2's fast tokenizer (XTuner's), chat tokens
included, on any sentencepiece version: names of reserved pieces typed in text stay text and a NUL gets its
piece, checked against the fast tokenizer rebuilt from the same file and by a randomized test; chat-token names
typed as content stay text; loading keeps stderr clean; `python -m llava_min.tokenizer train` makes a small
model with the chat tokens at the documented ids that round-trips text."""
import functools
import json
import pickle
import random
import re
import subprocess
import sys
import unicodedata

import pytest
import sentencepiece as spm

from llava_min import LlavaMinError
from llava_min.tokenizer import CHAT_TOKENS, TRAINED_IDS, Tokenizer
from llava_min.tools.tokenizer_train import train

from conftest import ROOT

REAL_IDS = {"<|plugin|>": 92538, "<|interpreter|>": 92539, "<|action_end|>": 92540,
            "<|action_start|>": 92541, "<|im_end|>": 92542, "<|im_start|>": 92543}
RESERVED = range(92397, 92544)  # the 147 [UNUSED_TOKEN_n] pieces, the chat tokens' among them
CONTROL = {0, 1, 2}             # <unk> <s> </s>
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
    """InternLM2's fast tokenizer (XTuner's), rebuilt offline from the same file as its remote code builds it.

    InternLM2 ships no tokenizer.json: `InternLM2TokenizerFast` converts tokenizer.model at load with
    `InternLM2Converter` (tokenization_internlm2_fast.py): a `tokenizers` BPE over the sentencepiece vocabulary
    (pieces 0-2 named <unk> <s> </s>, the six chat pieces renamed as in tokenizer_config.json), merges from
    transformers 4.x `SentencePieceExtractor.extract(vocab_scores)`, byte fallback, " " -> "▁", no
    pre-tokenizer, and only the chat tokens, <s>, </s>, <unk> as added tokens: sentencepiece's user-defined
    pieces are plain vocabulary there. This is that code, written out.
    """
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")

    sp = spm.SentencePieceProcessor(model_file=str(path))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    names = {i: name for name, i in REAL_IDS.items()} | {0: "<unk>", 1: "<s>", 2: "</s>"}
    vocab_scores = [(names.get(i, sp.id_to_piece(i)), 0.0 if i < 3 else sp.get_score(i)) for i in range(n)]
    merges = []  # SentencePieceExtractor.extract: every split of a piece into two pieces, by score
    for piece, score in dict(vocab_scores).items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges = [(left, right) for left, right, _ in sorted(merges, key=lambda m: m[2], reverse=True)]
    bpe = tokenizers.models.BPE({piece: i for i, (piece, _) in enumerate(vocab_scores)}, merges,
                                unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(bpe)
    backend.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.Replace(" ", "▁")])
    backend.add_special_tokens([tokenizers.AddedToken(name, special=True, normalized=False)
                                for name in [*REAL_IDS, "<unk>", "<s>", "</s>"]])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="</s>")


@functools.lru_cache
def hf_sentencepiece_tokenizer(path):
    """transformers' sentencepiece (slow) tokenizer over the same file, the six chat tokens registered at their
    ids as InternLM2's tokenizer_config.json does (added_tokens_decoder, special, no stripping)."""
    sp_backend = pytest.importorskip("transformers.tokenization_utils_sentencepiece")
    from transformers import AddedToken

    added = {i: AddedToken(name, special=True, normalized=False, lstrip=False, rstrip=False)
             for name, i in REAL_IDS.items()}
    return sp_backend.SentencePieceBackend(vocab_file=str(path), added_tokens_decoder=added, bos_token="<s>",
                                           eos_token="</s>", unk_token="<unk>", pad_token="</s>")


@pytest.fixture
def hf_reference(real_tokenizer_path):
    return hf_internlm2_tokenizer(real_tokenizer_path)


@pytest.fixture
def fast(real_tokenizer_path):
    """The fast tokenizer, or None without tokenizers/transformers (the tests' literal ids still run)."""
    try:
        return hf_internlm2_tokenizer(real_tokenizer_path)
    except pytest.skip.Exception:
        return None


def test_chat_template_ids(real):
    assert real.encode("<|im_start|>user\nhi<|im_end|>\n", bos=True) == [1, 92543, 1008, 364, 6176, 92542, 364]
    assert (real.bos_id, real.eos_id, real.vocab_size) == (1, 2, 92544)
    assert (real.im_start_id, real.im_end_id) == (92543, 92542)
    assert real.special_ids == REAL_IDS
    for name, i in REAL_IDS.items():
        assert real.encode(name) == [i]
        assert real.decode([i]) == name


def test_same_ids_as_transformers(real, hf_reference, real_tokenizer_path):
    for text in TEXTS:
        assert real.encode(text) == hf_reference.encode(text, add_special_tokens=False), text
    # transformers' sentencepiece tokenizer agrees where the text holds no reserved name and no NUL (on those
    # it matches [UNUSED_TOKEN_145] as a piece, and on sentencepiece >= 0.2.1 gives a NUL byte fallback)
    slow = hf_sentencepiece_tokenizer(real_tokenizer_path)
    for text in TEXTS[:2] + TEXTS[3:4]:
        assert real.encode(text) == slow.encode(text, add_special_tokens=False), text


def test_reserved_piece_names_are_text(real, fast):
    """[UNUSED_TOKEN_n] typed in text: plain sentencepiece matches it as a user-defined piece; the fast
    tokenizer, and so llava-min, encodes its characters (with either value of `special`)."""
    for special in (False, True):
        assert real.encode("[UNUSED_TOKEN_0]", special=special) == [336, 2010, 15927, 18827, 284, 300, 332]
        assert real.encode(" as [UNUSED_TOKEN_145]", special=special)[:3] == [569, 640, 2010]  # ▁as ▁[ UN
    for n in range(147):
        for text in (f"[UNUSED_TOKEN_{n}]", f" as [UNUSED_TOKEN_{n}].", f"x[UNUSED_TOKEN_{n}]\n"):
            ids = real.encode(text, special=False)
            assert not set(ids) & set(RESERVED) and real.decode(ids) == text, text
            assert fast is None or ids == fast.encode(text, add_special_tokens=False), text
    # the other user-defined pieces (fullwidth letters, "——", "……"): no longer piece holds one, so greedy
    # matching and BPE agree on them; still the fast tokenizer's ids
    for text in ["ＥＦ——……———", "x——y", "……\n", "ａｂｃ", "Ｚoom"]:
        assert fast is None or real.encode(text, special=False) == fast.encode(text, add_special_tokens=False), text


def test_nul_is_its_piece_on_any_sentencepiece(real, fast):
    """A NUL is piece 354 in the fast tokenizer and with sentencepiece <= 0.2.0; sentencepiece >= 0.2.1 alone
    gives byte fallback <0x00> (id 3). llava-min gives 354 whichever is installed."""
    plain = spm.SentencePieceProcessor(model_file=str(real.path))
    new_sentencepiece = tuple(int(v) for v in spm.__version__.split(".")[:3]) >= (0, 2, 1)
    assert plain.encode("a\x00b") == ([264, 3, 260] if new_sentencepiece else [264, 354, 260])
    for special in (False, True):
        assert real.encode("\x00", special=special) == [354]
        assert real.encode("a\x00b\x00\x00 c", special=special) == [264, 354, 260, 354, 354, 403]  # ... ▁c
    assert real.decode([264, 354, 260]) == "a\x00b"
    for text in ["\x00", "\x00\x00", " \x00 ", "中\x00文", "<|im_end|>\x00<|im_start|>"]:
        assert fast is None or real.encode(text) == fast.encode(text, add_special_tokens=False), repr(text)
    # what makes cutting the text at a NUL exact: no other piece holds one
    assert [i for i in range(real.vocab_size) if "\x00" in real.sp.id_to_piece(i)] == [354]


def _random_text(rng: random.Random) -> str:
    """A string of 1-12 parts: reserved and other user-defined pieces, chat-token names, control characters,
    CJK, emoji, whitespace runs and words made of the reserved names' own characters."""
    kinds = [
        lambda: f"[UNUSED_TOKEN_{rng.randrange(147)}]",
        lambda: rng.choice(["——", "……", "Ｅ", "ｚ", "——…", "Ａ"]),
        lambda: rng.choice(CHAT_TOKENS + ("<s>", "</s>", "<unk>", "<|im_end|", "<|")),
        lambda: chr(rng.choice([*range(32), 127, 0x85])),
        lambda: "".join(chr(rng.randrange(0x4E00, 0xA000)) for _ in range(rng.randint(1, 4))),
        lambda: rng.choice(["🙂", "👍🏽", "👨‍👩‍👧", "🇫🇷", chr(rng.randrange(0x1F300, 0x1FB00))]),
        lambda: "".join(rng.choice([" ", "\t", "\n", "\r\n", "\u3000", "\xa0"])
                        for _ in range(rng.randint(1, 6))),
        lambda: rng.choice(["as", " the", "cat", "[", "]", "_", "UNUSED", "_TOKEN_", "145", " 2024", "[UNUSED_TOKEN_",
                            "[UNUSED_TOKEN_147]", "TOKEN_0]", "ü", "é", "Ω"]),
    ]
    return "".join(rng.choice(kinds)() for _ in range(rng.randint(1, 12)))


def test_random_text_encodes_as_the_fast_tokenizer(real, real_tokenizer_path, fast):
    """Seeded: message text never yields a reserved or control id and decodes back to itself; it equals plain
    sentencepiece wherever it holds no reserved/user-defined piece name and no control character; and it
    equals InternLM2's fast tokenizer (rebuilt) wherever that does not turn <s>/</s>/<unk>/chat names into
    control tokens, the one documented difference (with special=True the chat names match there too)."""
    plain = spm.SentencePieceProcessor(model_file=str(real_tokenizer_path))
    piece_name = re.compile(r"\[UNUSED_TOKEN_\d+\]|——|……|[Ａ-Ｚａ-ｚ]")
    rng, compared = random.Random(0), 0
    for _ in range(400):
        text = _random_text(rng)
        ids = real.encode(text, special=False)
        assert not set(ids) & (set(RESERVED) | CONTROL), repr(text)
        assert real.decode(ids) == text, repr(text)
        if not piece_name.search(text) and not any(unicodedata.category(c) == "Cc" for c in text):
            assert ids == plain.encode(text), repr(text)
            compared += 1
        if fast is not None and not re.search(r"<s>|</s>|<unk>", text):
            assert real.encode(text) == fast.encode(text, add_special_tokens=False), repr(text)
            if not any(name in text for name in CHAT_TOKENS):
                assert ids == fast.encode(text, add_special_tokens=False), repr(text)
    assert compared > 20  # the plain-sentencepiece clause was exercised


def test_special_false_keeps_names_as_text(real):
    for text in TEXTS:
        ids = real.encode(text, special=False)
        assert not set(ids) & set(REAL_IDS.values()), text
        assert real.decode(ids) == text
    # the piece name itself, which sentencepiece alone would match as a user-defined piece
    assert spm.SentencePieceProcessor(model_file=str(real.path)).encode("[UNUSED_TOKEN_145]") == [92542]
    assert 92542 not in real.encode("[UNUSED_TOKEN_145]", special=False)


def test_decode(real):
    ids = real.encode("<|im_start|>assistant\nA cat.<|im_end|>", bos=True)
    assert real.decode(ids) == "<|im_start|>assistant\nA cat.<|im_end|>"
    assert real.decode(ids, skip_special=True) == "assistant\nA cat."
    with pytest.raises(LlavaMinError, match=r"92544.*outside this tokenizer's vocabulary of 92544"):
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
    with pytest.raises(LlavaMinError, match=rf"{bad}: not a sentencepiece model"):
        Tokenizer(bad)
    with pytest.raises(LlavaMinError, match=r"cannot read the tokenizer model .*missing.model"):
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
    with pytest.raises(LlavaMinError, match=r"--vocab-size 200.*256 byte pieces"):
        train([data], vocab_size=200, out=tmp_path / "small.model", threads=1)


def test_fewer_pieces_than_asked_are_explained(tmp_path, capsys):
    from llava_min.tools.tokenizer_train import main
    data = _write_corpus(tmp_path / "train.json", n=40)
    main(["train", "--data", str(data), "--vocab-size", "5000", "--out", str(tmp_path / "tok.model"),
          "--threads", "1"])
    said = capsys.readouterr().out
    n = Tokenizer(tmp_path / "tok.model").vocab_size
    assert n < 5000
    assert f"note: {n} pieces, fewer than the 5000 asked for: 3 control pieces, 6 chat tokens, 256 byte pieces" in said
    assert "the text has no pair left to merge" in said
    main(["train", "--data", str(data), "--vocab-size", "300", "--out", str(tmp_path / "t2.model"), "--threads", "1"])
    assert "fewer than" not in capsys.readouterr().out      # as many as asked: nothing to explain
