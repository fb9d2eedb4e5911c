"""InternLM2's tokenizer: its sentencepiece BPE model, read as InternLM2's fast (Hugging Face)
tokenizer reads it.

Start at `Tokenizer.encode`. The released tokenizer.model (sha256 f868398f...) has byte fallback,
split digits, no dummy prefix, no whitespace clean-up, and holds its chat tokens in reserved pieces
(INTERNLM2_PIECES); a model from `python -m llava_min.tokenizer train` names them at TRAINED_IDS.
Text encodes as the fast tokenizer (XTuner's) encodes it; where plain sentencepiece differs:
`spmproto.as_fast_tokenizer_reads_it` and `_encode_text`.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from itertools import groupby
from pathlib import Path

import sentencepiece as spm

from . import LlavaMinError
from .spmproto import as_fast_tokenizer_reads_it

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>",
               "<|plugin|>")
# One group around the names: re.split keeps them.
CHAT_TOKEN_SPLIT = re.compile("(" + "|".join(map(re.escape, CHAT_TOKENS)) + ")")
# The pieces that hold them in the released model: <|im_start|> [UNUSED_TOKEN_146] 92543 down to
# <|plugin|> [UNUSED_TOKEN_141] 92538 (the names exist only in HF's tokenizer_config.json
# `added_tokens_decoder`).
INTERNLM2_PIECES = {name: f"[UNUSED_TOKEN_{146 - k}]" for k, name in enumerate(CHAT_TOKENS)}
# Where `train` puts them: sentencepiece numbers user-defined pieces right after <unk> 0, <s> 1, </s> 2.
TRAINED_IDS = {name: 3 + i for i, name in enumerate(CHAT_TOKENS)}

# sentencepiece >= 0.2.1 logs this to fd 2 on each load of the released model (piece 354 is a
# NUL), in every loader worker; `_encode_text` gives the NUL its piece itself, so the line is noise.
_HARMLESS_LOAD_LOG = re.compile(r"is a null character \(\\0\) and byte_fallback is enabled"
                                r"|absl::InitializeLog")


def _load_sentencepiece(proto: bytes, path: str) -> spm.SentencePieceProcessor:
    """Load a serialized model, keeping its harmless log line off stderr (the C++ library writes
    to fd 2)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        # No usable fd 2 (a daemon): nothing to keep clean.
        saved = None
    with tempfile.TemporaryFile() as caught:
        if saved is not None:
            os.dup2(caught.fileno(), 2)
        try:
            return spm.SentencePieceProcessor(model_proto=proto)
        except (RuntimeError, OSError) as e:
            raise LlavaMinError(f"{path}: not a sentencepiece model ({e}); give the InternLM2 "
                                "tokenizer.model or one written by `python -m llava_min.tokenizer "
                                "train`") from e
        finally:
            # fd 2 back, and whatever else the library said.
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            caught.seek(0)
            rest = [line for line in caught.read().decode("utf-8", "replace").splitlines()
                    if not _HARMLESS_LOAD_LOG.search(line)]
            if rest:
                print("\n".join(rest), file=sys.stderr)


class Tokenizer:
    """sentencepiece + InternLM2's chat tokens. Picklable (loader workers get their own copy)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            proto = Path(self.path).read_bytes()
        except OSError as e:
            raise LlavaMinError(f"cannot read the tokenizer model {self.path}: {e}") from e
        self._load(proto)

    def _load(self, proto: bytes) -> None:
        # User-defined pieces made plain vocabulary, as the fast tokenizer has them (spmproto.py).
        try:
            proto, self._nul_id = as_fast_tokenizer_reads_it(proto)
        except IndexError:
            # A field ran past the end: not a model, which sentencepiece says below.
            self._nul_id = None
        self.sp = _load_sentencepiece(proto, self.path)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise LlavaMinError(f"{self.path}: the model defines no <s>/</s> ids (bos {self.bos_id}, "
                                f"eos {self.eos_id}); train it with `python -m llava_min.tokenizer "
                                "train`")
        self.special_ids: dict[str, int] = {}
        for name in CHAT_TOKENS:
            for piece in (name, INTERNLM2_PIECES[name]):
                # The unknown id when absent, hence the check.
                i = self.sp.piece_to_id(piece)
                if self.sp.id_to_piece(i) == piece:
                    self.special_ids[name] = i
                    break
            else:
                raise LlavaMinError(f"{self.path}: no piece for the chat token {name} (looked for "
                                    f"{name!r} and {INTERNLM2_PIECES[name]!r}); use the InternLM2 "
                                    "tokenizer.model or one written by `python -m llava_min.tokenizer "
                                    "train`")
        self.im_start_id = self.special_ids["<|im_start|>"]
        self.im_end_id = self.special_ids["<|im_end|>"]
        self._names = {i: name for name, i in self.special_ids.items()}

    # Pickled with the rewritten proto: rewriting it again in _load changes nothing.
    def __getstate__(self):
        return {"path": self.path, "proto": self.sp.serialized_model_proto()}

    def __setstate__(self, state):
        self.path = state["path"]
        self._load(state["proto"])

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = False, special: bool = True) -> list[int]:
        """Token ids of `text` (no </s> is ever added). special: the six chat-token names become
        their ids, as HF's added tokens do; special=False: `text` is content (data.py's messages),
        all of it text."""
        ids = []
        if bos:
            ids.append(self.bos_id)
        parts = [text]
        if special:
            parts = CHAT_TOKEN_SPLIT.split(text)
        for k, part in enumerate(parts):
            if k % 2:
                # The odd parts of re.split with a group: the names.
                ids.append(self.special_ids[part])
            elif part:
                ids += self._encode_text(part)
        return ids

    def _encode_text(self, text: str) -> list[int]:
        if self._nul_id is None or "\0" not in text:
            return self.sp.encode(text)
        # sentencepiece >= 0.2.1 refuses a piece that is a NUL character and encodes NUL by byte
        # fallback (<0x00>, id 3); the fast tokenizer, and sentencepiece <= 0.2.0, use the piece
        # (354 in InternLM2's). No longer piece holds a NUL (the trainer makes none), so cutting the
        # text there changes no merge.
        ids = []
        for k, chunk in enumerate(self.sp.encode(text.split("\0"))):
            if k:
                ids.append(self._nul_id)
            ids += chunk
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of `ids`; chat tokens appear by name (or not at all with skip_special); <s>, </s>
        vanish."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise LlavaMinError(f"cannot decode ids {bad[:8]}: outside this tokenizer's vocabulary of "
                                f"{self.vocab_size} ({self.path}); an LLM with a padded vocabulary can "
                                "produce them: drop them first")
        out = []
        # Runs of text ids and of chat tokens.
        for special, run in groupby(ids, key=self._names.__contains__):
            if not special:
                out.append(self.sp.decode(list(run)))
            elif not skip_special:
                out += [self._names[i] for i in run]
        return "".join(out)


# `python -m llava_min.tokenizer train|encode`: the commands live in tools/.
if __name__ == "__main__":
    from .tools.tokenizer_train import main
    main()
