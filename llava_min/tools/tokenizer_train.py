"""Train a small sentencepiece model like InternLM2's for from-scratch runs; print a text's ids.

    python -m llava_min.tokenizer train --data FILE [FILE ...] --vocab-size N --out tok.model
    python -m llava_min.tokenizer encode --tokenizer tok.model "text"

(`python -m llava_min.tools.tokenizer_train` is the same.) Start at `train`.
"""
from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import sentencepiece as spm

from .. import LlavaMinError
from ..data import IMAGE_TAG, INSTRUCTION, SEP, SUFFIX, Samples
from ..tokenizer import CHAT_TOKENS, TRAINED_IDS, Tokenizer
from ..weights import write_atomic


def train(files, vocab_size: int, out: str | os.PathLike, threads: int | None = None) -> Tokenizer:
    """Train a BPE model like InternLM2's on the conversations in `files`; write it to `out`.
    Each turn's prompt and answer is one sentence, prompts in the internlm2_chat template (so
    "user\\n" and "assistant\\n" get pieces at the frequency training sees them; the chat tokens
    are user-defined pieces)."""
    text = []
    for sample in Samples(files).scan():
        for message in sample.get("conversations") or []:
            # Bad samples are data.py's to report; here they only miss the vocabulary.
            if not isinstance(message, dict) or not isinstance(message.get("value"), str):
                continue
            value = message["value"].replace(IMAGE_TAG, "").strip()
            if message.get("from") == "human":
                text.append(INSTRUCTION.format(input=value))
            else:
                text.append(value + SUFFIX + SEP)
    named = ", ".join(map(str, files))
    if not text:
        raise LlavaMinError(f"no conversation text in {named}; nothing to train on")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text), model_writer=buf, model_type="bpe",
            vocab_size=vocab_size,
            # as the released model's trainer_spec: bytes for anything unseen, digits one by one,
            # the text exactly as given (no dummy prefix, no whitespace clean-up, identity
            # normalisation)
            byte_fallback=True, split_digits=True, add_dummy_prefix=False,
            remove_extra_whitespaces=False, normalization_rule_name="identity",
            allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=list(CHAT_TOKENS),
            # a small corpus may yield fewer pieces: fine, and `shortfall` says why
            character_coverage=1.0, hard_vocab_limit=False,
            max_sentence_length=1 << 16, input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            num_threads=threads or min(8, os.cpu_count() or 1), minloglevel=2)
    except RuntimeError as e:
        raise LlavaMinError(f"sentencepiece could not train on {named} with --vocab-size "
                            f"{vocab_size}: {e}. The vocabulary must hold 3 control pieces, the 6 "
                            "chat tokens, 256 byte pieces and every character of the data") from e
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, buf.getvalue())  # a killed run leaves no half-written model behind
    tok = Tokenizer(out)
    assert {name: tok.special_ids[name] for name in CHAT_TOKENS} == TRAINED_IDS, tok.special_ids
    return tok


def shortfall(tok: Tokenizer, asked: int) -> str:
    """Why a model has fewer pieces than --vocab-size asked for, counted by kind."""
    sp = tok.sp
    n = sp.get_piece_size()
    fixed = sum(1 for i in range(n) if sp.is_control(i) or sp.is_unknown(i))
    byte = sum(1 for i in range(n) if sp.is_byte(i))
    chat = sum(1 for i in range(n) if sp.id_to_piece(i) in CHAT_TOKENS)
    chars = sum(1 for i in range(n) if len(sp.id_to_piece(i)) == 1 and not sp.is_control(i))
    merged = n - fixed - byte - chat - chars
    return (f"note: {n} pieces, fewer than the {asked} asked for: {fixed} control pieces, {chat} "
            f"chat tokens, {byte} byte pieces, {chars} characters and {merged} merged pieces are "
            "all this text yields. BPE makes a piece by merging two neighbours inside a word "
            "(never across a space, at most 16 characters), and the text has no pair left to "
            "merge. The model is complete as it is (ids 0 to n-1); more, or more varied, text "
            "gives more pieces")


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
            if tok.vocab_size < args.vocab_size:
                print(shortfall(tok, args.vocab_size))
        else:
            tok = Tokenizer(args.tokenizer)
            ids = tok.encode(args.text.replace("\\n", "\n"), bos=args.bos, special=not args.plain)
            print(ids)
            print([tok.sp.id_to_piece(i) for i in ids])
    except ValueError as e:  # LlavaMinError (and data.py's errors): the message says what to do
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
