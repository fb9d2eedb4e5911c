"""InternLM2's tokenizer: a sentencepiece BPE model plus the six chat tokens, and a trainer for small models.

The released InternLM2 `tokenizer.model` (InternLM/InternEvo `tools/tokenizer_internlm2.model`, sha256 f868398f...) is a sentencepiece BPE model with byte
fallback, split digits, no dummy prefix and no whitespace clean-up. The chat tokens that the internlm2_chat
template uses are NOT stored under their names: the model holds `[UNUSED_TOKEN_141]`..`[UNUSED_TOKEN_146]`
at ids 92538..92543, and the `<|...|>` names exist only in Hugging Face's tokenizer_config.json. So this
module maps the names itself:

    <|plugin|> 92538   <|interpreter|> 92539   <|action_end|> 92540
    <|action_start|> 92541   <|im_end|> 92542   <|im_start|> 92543      (<s> 1, </s> 2, <unk> 0)

A model trained here (`python -m llava_min.tokenizer train`) stores the chat tokens under their own names,
as user-defined pieces at fixed small ids right after <unk> <s> </s> (see TRAINED_IDS):

    <|im_start|> 3   <|im_end|> 4   <|action_start|> 5   <|action_end|> 6   <|interpreter|> 7   <|plugin|> 8

`Tokenizer` finds each chat token by name in either kind of model.

encode(text, special=True) parses the six names in `text` to their ids, as HF's tokenizer does with its
added tokens. encode(text, special=False) treats `text` as content: a "<|im_end|>" typed in a message
stays the ten characters it is (and so does the `[UNUSED_TOKEN_145]` piece name, which sentencepiece
itself would otherwise match as a user-defined piece). data.py encodes message text this way.

Command line:
    python -m llava_min.tokenizer train --data FILE [FILE ...] --vocab-size N --out tok.model
    python -m llava_min.tokenizer encode --tokenizer tok.model "text"
"""
from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>")
# The pieces that hold the chat tokens inside the released InternLM2 tokenizer.model (its tokenizer_config.json `added_tokens_decoder` names them).
INTERNLM2_PIECES = {
    "<|plugin|>": "[UNUSED_TOKEN_141]",        # 92538
    "<|interpreter|>": "[UNUSED_TOKEN_142]",   # 92539
    "<|action_end|>": "[UNUSED_TOKEN_143]",    # 92540
    "<|action_start|>": "[UNUSED_TOKEN_144]",  # 92541
    "<|im_end|>": "[UNUSED_TOKEN_145]",        # 92542
    "<|im_start|>": "[UNUSED_TOKEN_146]",      # 92543
}
# Where `train` puts them: sentencepiece numbers user-defined pieces right after <unk> 0, <s> 1, </s> 2.
TRAINED_IDS = {name: 3 + i for i, name in enumerate(CHAT_TOKENS)}

# sentencepiece >= 0.2.1 logs this through absl, straight to file descriptor 2, each time it loads the
# released InternLM2 model: piece 354 is a NUL character, which byte fallback (<0x00>) already covers, so
# sentencepiece treats the piece as unused and the ids do not change. Every loader worker would print it.
_HARMLESS_LOAD_LOG = re.compile(r"is a null character \(\\0\) and byte_fallback is enabled|absl::InitializeLog")


class TokenizerError(ValueError):
    """A tokenizer file cannot be used, or a tokenizer cannot be trained from the given data."""


def _load_sentencepiece(proto: bytes, path: str) -> spm.SentencePieceProcessor:
    """Load a serialized model, keeping only sentencepiece's known-harmless log line off stderr.

    The C++ library writes to fd 2 directly, so the capture is at the file-descriptor level; whatever else
    it prints during the load is passed on unchanged.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (a daemon): nothing to keep clean
        saved = None
    error = None
    with tempfile.TemporaryFile() as caught:
        if saved is not None:
            os.dup2(caught.fileno(), 2)
        try:
            sp = spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError) as e:
            error = e
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
        caught.seek(0)
        lines = caught.read().decode("utf-8", "replace").splitlines()
    rest = [line for line in lines if not _HARMLESS_LOAD_LOG.search(line)]
    if rest:
        print("\n".join(rest), file=sys.stderr)
    if error is not None:
        raise TokenizerError(f"{path}: not a sentencepiece model ({error}); give the InternLM2 tokenizer.model "
                             f"or one written by `python -m llava_min.tokenizer train`") from error
    return sp


class Tokenizer:
    """sentencepiece + InternLM2's chat tokens. Picklable (loader workers get their own copy)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            proto = Path(self.path).read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read the tokenizer model {self.path}: {e}") from e
        self._load(proto)

    def _load(self, proto: bytes) -> None:
        self.sp = _load_sentencepiece(proto, self.path)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"{self.path}: the model defines no <s>/</s> ids (bos {self.bos_id}, eos "
                                 f"{self.eos_id}); train it with `python -m llava_min.tokenizer train`")
        self.special_ids: dict[str, int] = {}
        for name in CHAT_TOKENS:
            for piece in (name, INTERNLM2_PIECES[name]):
                i = self.sp.piece_to_id(piece)  # the unknown id when absent, hence the check below
                if self.sp.id_to_piece(i) == piece:
                    self.special_ids[name] = i
                    break
            else:
                raise TokenizerError(f"{self.path}: no piece for the chat token {name} (looked for {name!r} and "
                                     f"{INTERNLM2_PIECES[name]!r}); use the InternLM2 tokenizer.model or one "
                                     f"written by `python -m llava_min.tokenizer train`")
        self.im_start_id = self.special_ids["<|im_start|>"]
        self.im_end_id = self.special_ids["<|im_end|>"]
        self._names = {i: name for name, i in self.special_ids.items()}
        self._special_re = re.compile("|".join(map(re.escape, CHAT_TOKENS)))
        # The chat-token pieces that sentencepiece matches inside plain text (user-defined pieces: the
        # `[UNUSED_TOKEN_14x]` names in the real model, the `<|...|>` names in a trained one).
        literal = [self.sp.id_to_piece(i) for i in self._names if self.sp.encode(self.sp.id_to_piece(i)) == [i]]
        self._literal_re = re.compile("|".join(map(re.escape, literal))) if literal else None

    def __getstate__(self):
        return {"path": self.path, "proto": self.sp.serialized_model_proto()}

    def __setstate__(self, state):
        self.path = state["path"]
        self._load(state["proto"])

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = False, special: bool = True) -> list[int]:
        """Token ids of `text` (no </s> is ever added). special=False: chat-token names are plain text."""
        ids = [self.bos_id] if bos else []
        pattern = self._special_re if special else self._literal_re
        start = 0
        for m in pattern.finditer(text) if pattern is not None else ():
            ids += self.sp.encode(text[start:m.start()])
            if special:
                ids.append(self.special_ids[m.group()])
            else:
                # Encoding the piece name in two halves keeps sentencepiece from matching it whole.
                ids += self.sp.encode(m.group()[:1]) + self.sp.encode(m.group()[1:])
            start = m.end()
        return ids + self.sp.encode(text[start:])

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of `ids`; chat tokens appear by name (or not at all with skip_special); <s>, </s> vanish."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"cannot decode ids {bad[:8]}: outside this tokenizer's vocabulary of "
                                 f"{self.vocab_size} ({self.path}); an LLM with a padded vocabulary can produce "
                                 f"them, so drop them before decoding")
        out, run = [], []
        for i in ids:
            if i in self._names:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special:
                    out.append(self._names[i])
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)


# --------------------------------------------------------------------------------------------------
# Training a small model for from-scratch experiments

def training_text(samples) -> list[str]:
    """The strings the data pipeline encodes: each turn's prompt and answer as their own sentence.

    Prompts are rendered with the internlm2_chat template (so "user\\n" and "assistant\\n" get pieces at the
    frequency training will see them); the chat tokens themselves are atomic user-defined pieces.
    """
    from .data import IMAGE_TAG, INSTRUCTION, SUFFIX, SEP  # data.py imports this module, not the reverse

    text = []
    for sample in samples:
        for message in sample.get("conversations") or []:
            value = message.get("value") if isinstance(message, dict) else None
            if not isinstance(value, str):
                continue  # bad samples are data.py's to report; here they only miss the vocabulary
            value = value.replace(IMAGE_TAG, "").strip()
            text.append(INSTRUCTION.format(input=value) if message.get("from") == "human" else value + SUFFIX + SEP)
    return text


def train(files, vocab_size: int, out: str | os.PathLike, threads: int | None = None) -> Tokenizer:
    """Train a BPE model like InternLM2's on the conversations in `files`; write it to `out`."""
    from .data import load_samples

    text = training_text(load_samples(files))
    if not text:
        raise TokenizerError(f"no conversation text in {', '.join(map(str, files))}; nothing to train on")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
            # as the released model's trainer_spec: bytes for anything unseen, digits one by one, the text
            # exactly as given (no dummy prefix, no whitespace clean-up, identity normalisation)
            byte_fallback=True, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
            normalization_rule_name="identity", allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=list(CHAT_TOKENS),
            character_coverage=1.0, hard_vocab_limit=False,  # a small corpus may yield fewer pieces: fine
            max_sentence_length=1 << 16, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            num_threads=threads or max(1, min(8, os.cpu_count() or 1)), minloglevel=2)
    except RuntimeError as e:
        raise TokenizerError(f"sentencepiece could not train on {', '.join(map(str, files))} with --vocab-size "
                             f"{vocab_size}: {e}. The vocabulary must hold 3 control pieces, the 6 chat tokens, "
                             f"256 byte pieces and every character of the data") from e
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(out)  # atomic: a killed run leaves no half-written model behind
    tok = Tokenizer(out)
    assert {name: tok.special_ids[name] for name in CHAT_TOKENS} == TRAINED_IDS, tok.special_ids
    return tok


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m llava_min.tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a small BPE model on LLaVA-format conversations")
    t.add_argument("--data", nargs="+", required=True, help="LLaVA JSON (a list) or JSONL files")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="where to write the .model file")
    t.add_argument("--threads", type=int, default=None)
    e = sub.add_parser("encode", help="print the ids and pieces of a text")
    e.add_argument("--tokenizer", required=True)
    e.add_argument("--bos", action="store_true")
    e.add_argument("--plain", action="store_true", help="treat chat-token names as text")
    e.add_argument("text", help="text to encode; \\n stands for a newline")
    args = p.parse_args(argv)
    try:
        if args.command == "train":
            tok = train(args.data, args.vocab_size, args.out, args.threads)
            chat = ", ".join(f"{n} {i}" for n, i in tok.special_ids.items())
            print(f"wrote {args.out}: {tok.vocab_size} pieces; chat tokens {chat}")
        else:
            tok = Tokenizer(args.tokenizer)
            ids = tok.encode(args.text.replace("\\n", "\n"), bos=args.bos, special=not args.plain)
            print(ids)
            print([tok.sp.id_to_piece(i) for i in ids])
    except ValueError as e:  # TokenizerError, DataError: the message says what to do
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
