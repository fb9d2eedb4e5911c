"""The user's mistakes, caught before any data is read or any model built: one message, status 2.

    p = preflight.ArgumentParser(description=__doc__)     # names a mistyped flag; --help: defaults
    args = p.parse_args(argv)
    preflight.check(args, INHERITED)                      # every path and flag combination; exit 2
    print0(preflight.changes(args, init_dir, INHERITED))  # stage 2: "image_size 56 (stage 1: 336)"

A mistake in a path or a flag is the user's, not a bug: it gets one message saying what is wrong,
where, and what to do, and no traceback (tracebacks are for bugs). Everything here is cheap: files
are looked at, model configs and safetensors headers read, never a data file or a tensor, so the
answer comes in about the time Python takes to import torch. Every problem found is listed in the
one message, so that a user fixes them all at once.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import sys
from pathlib import Path

from . import LlavaMinError, checkpoint, weights
from .internlm2 import load_config as llm_config
from .llava import CONFIG_FILE, parse_parts, vision_config
from .tokenizer import Tokenizer

# argparse's exit status for a bad command line; ours for every user error found here.
USAGE_ERROR = 2


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (the script's docstring, launch lines and all), and each
    flag's default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default in (None, argparse.SUPPRESS):
            return text
        if "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistyped flag is named with the closest real one, and an error is one
    short message."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        # argparse leaves a flag without help out of --help's defaults: give it a line of its own.
        if not kwargs.get("help") and kwargs.get("default") not in (None, argparse.SUPPRESS):
            kwargs["help"] = "default: %(default)s"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            message = "; ".join(self._unknown(word) for word in message[len(prefix):].split())
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.stderr.write(f"(`{self.prog} --help` lists every flag)\n")
        sys.exit(USAGE_ERROR)

    def _unknown(self, word: str) -> str:
        if not word.startswith("-"):
            return f"unexpected argument {word!r} (every value follows its flag)"
        name = word.split("=", 1)[0]
        options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        # The closest spelling; failing that, a flag the typed one begins with (--output-dir: --out).
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
        if not close:
            close = sorted((o for o in options if name.startswith(o)), key=len, reverse=True)[:1]
        if not close:
            close = difflib.get_close_matches(name, options, n=1, cutoff=0.4)
        if not close:
            return f"unknown flag {name}"
        return f"unknown flag {name}; did you mean {close[0]}?"


class _Problems:
    """The problems found so far, each one line: what, where, what to do."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def path(self, flag: str, value, kind: str) -> bool:
        """Whether `value` exists as a `kind` ("file" or "folder"); if not, say so, once."""
        path = Path(value)
        if kind == "folder" and path.is_dir() or kind == "file" and path.is_file():
            return True
        if not path.exists():
            self.add(f"{flag} {value}: the {kind} does not exist (a typo, or a path relative to "
                     f"another folder: this one is relative to {os.getcwd()})")
        else:
            self.add(f"{flag} {value}: not a {kind}")
        return False


def check(args, inherited: dict) -> None:
    """Every path and flag combination of train.py / finetune.py; on any problem, print them all
    and exit 2."""
    problems = _Problems()
    saved = _check_init_from(args, problems)
    _check_paths(args, problems)

    def effective(key: str):
        """A setting as the run will use it: the flag, else stage 1's (args.json), else the default."""
        if getattr(args, key) is not None:
            return getattr(args, key)
        if saved.get(key) is not None:
            return saved[key]
        return inherited[key]

    _check_numbers(args, problems, effective)
    _check_combinations(args, problems, effective)
    _check_tokenizer(args, problems)
    if problems.lines:
        _report(problems.lines)


def _report(lines: list[str]) -> None:
    """Print on one rank per node (every node checks its own paths), exit 2, no traceback."""
    if os.environ.get("RANK", "0") == "0" or os.environ.get("LOCAL_RANK", "0") == "0":
        prog = Path(sys.argv[0]).name
        head = f"{len(lines)} errors"
        if len(lines) == 1:
            head = "error"
        sys.stderr.write(f"{prog}: {head} in the command line (nothing was read or built):\n")
        sys.stderr.write("".join(f"  {line}\n" for line in lines))
        sys.stderr.flush()
    raise SystemExit(USAGE_ERROR)


def _check_init_from(args, problems: _Problems) -> dict:
    """--init-from must be a finished train.py output; returns its args.json ({} without one)."""
    if not args.init_from:
        return {}
    init = Path(args.init_from)
    if not problems.path("--init-from", init, "folder"):
        return {}
    if not (init / CONFIG_FILE).is_file():
        latest = checkpoint.latest_checkpoint(init)
        if latest is not None:
            problems.add(f"--init-from {init}: a run that has not finished (its last checkpoint is "
                         f"{latest}, and there is no {CONFIG_FILE}): finish it first with its "
                         "command and --resume")
        else:
            problems.add(f"--init-from {init}: no {CONFIG_FILE}, so not a folder written by "
                         "train.py; give the --out folder of a finished stage-1 run")
        return {}
    # The parts stage 2 loads from the folder: those not given with --llm, --vit, --projector.
    used = [part for part in ("llm", "vit", "projector") if not getattr(args, part)]
    for name in ("tokenizer.model", *used):
        if not (init / name).exists():
            problems.add(f"--init-from {init}: {name} is missing (the folder is incomplete); run "
                         f"stage 1 again into it, or give --{name.split('.')[0]} explicitly")
    file = init / "args.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        problems.add(f"{file}: not readable JSON ({e}); stage 2 inherits its settings from it: "
                     "fix or delete it")
        return {}


def _check_paths(args, problems: _Problems) -> None:
    for file in args.data:
        problems.path("--data", file, "file")
    problems.path("--image-folder", args.image_folder, "folder")
    if getattr(args, "eval_data", None):
        problems.path("--eval-data", args.eval_data, "file")
    if args.tokenizer:
        problems.path("--tokenizer", args.tokenizer, "file")
    for part, load in (("llm", llm_config), ("vit", vision_config)):
        folder = getattr(args, part)
        preset = getattr(args, f"{part}_config")
        if folder and preset:
            problems.add(f"--{part} {folder} loads weights and --{part}-config {preset} builds "
                         "fresh ones: give one")
        if folder and problems.path(f"--{part}", folder, "folder"):
            _loads(problems, f"--{part}", lambda: (load(folder), weights.checkpoint_files(folder)))
        elif preset:
            _loads(problems, f"--{part}-config", lambda: load(preset))
        elif not folder and not args.init_from:
            problems.add(f"give --{part} DIR (pretrained), --{part}-config NAME_OR_JSON (fresh), "
                         "or --init-from DIR")
    if args.projector and problems.path("--projector", args.projector, "folder"):
        _loads(problems, "--projector", lambda: weights.checkpoint_files(args.projector))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        problems.add(f"--out {out}: a file, not a folder; choose another --out")
    elif not args.resume and checkpoint.latest_checkpoint(out) is not None:
        problems.add(f"--out {out} already holds checkpoints: pass --resume to continue that run, "
                     "or choose another --out")


def _loads(problems: _Problems, flag: str, read) -> None:
    """Read a config or safetensors headers; what it raises is the user's (it names the file)."""
    try:
        read()
    except (LlavaMinError, OSError) as e:
        problems.add(f"{flag}: {e}")


def _check_numbers(args, problems: _Problems, effective) -> None:
    """Values no run can use: counts below 1, lengths and times not above 0."""
    at_least_one = ["batch_size", "grad_accum", "save_every", "keep", "max_steps", "eval_every"]
    for key in at_least_one:
        value = getattr(args, key, None)
        if value is not None and value < 1:
            problems.add(f"--{key.replace('_', '-')} {value}: must be at least 1")
    for key in ("max_length", "image_size"):
        if effective(key) < 1:
            problems.add(f"--{key.replace('_', '-')} {effective(key)}: must be at least 1")
    for key in ("epochs", "lr", "dist_timeout", "loader_timeout", "stop_grace"):
        value = getattr(args, key, None)
        if value is not None and not value > 0:
            problems.add(f"--{key.replace('_', '-')} {value}: must be more than 0")
    for key in ("num_workers", "lora_r", "pack", "weight_decay", "clip"):
        value = getattr(args, key)
        if value < 0:
            problems.add(f"--{key.replace('_', '-')} {value}: must not be negative")


def _check_combinations(args, problems: _Problems, effective) -> None:
    try:
        parts = parse_parts(args.train)
    except ValueError as e:
        problems.add(f"--train {args.train}: {e}")
        parts = set()
    if args.lora_r and parts and "llm" not in parts:
        problems.add(f"--lora-r {args.lora_r} trains the LLM through adapters: add llm to --train")
    if args.fsdp and args.zero:
        problems.add("--fsdp shards the optimizer state already (and the parameters and "
                     "gradients): drop --zero")
    max_length = effective("max_length")
    if args.pack and args.pack < max_length:
        problems.add(f"--pack {args.pack} is shorter than --max-length {max_length}: a sample cut "
                     "at --max-length must fit in one packed row; use --pack >= --max-length")
    if getattr(args, "eval_every", None) and not getattr(args, "eval_data", None):
        problems.add("--eval-every needs --eval-data FILE (the held-out set it evaluates)")
    if getattr(args, "new_tokenizer", False) and not args.init_from:
        problems.add("--new-tokenizer allows a tokenizer other than the --init-from folder's: "
                     "give --init-from")
    patch = _patch_size(args)
    image_size = effective("image_size")
    if patch and image_size % patch:
        problems.add(f"--image-size {image_size} is not a multiple of the ViT patch size {patch}")


def _source(args, part: str):
    """Where a part's config comes from: --PART, --PART-config, or the --init-from folder."""
    given = getattr(args, part) or getattr(args, f"{part}_config")
    if given:
        return given
    if args.init_from:
        return Path(args.init_from) / part
    return None


def _patch_size(args) -> int | None:
    """The ViT's patch size (None if its source is broken or missing: said already)."""
    source = _source(args, "vit")
    try:
        return vision_config(source).patch_size
    except (LlavaMinError, OSError, TypeError):
        return None


def _llm_vocab(args) -> int | None:
    """The LLM's vocab_size (None if its source is broken or missing: said already)."""
    source = _source(args, "llm")
    try:
        return llm_config(source).vocab_size
    except (LlavaMinError, OSError, TypeError):
        return None


def file_digest(path) -> str:
    """sha256 of a file's bytes: two tokenizers are one when their files are equal byte for byte."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _check_tokenizer(args, problems: _Problems) -> None:
    """The tokenizer loads, fits the LLM's vocabulary, and in stage 2 is stage 1's unless
    --new-tokenizer."""
    init_tok = None
    if args.init_from:
        init_tok = Path(args.init_from) / "tokenizer.model"
    tok_file = args.tokenizer or init_tok
    if tok_file is None:
        problems.add("give --tokenizer FILE (or --init-from a stage-1 folder, which holds one)")
        return
    if not Path(tok_file).is_file():
        return                      # said already (a missing --tokenizer, an incomplete --init-from)
    meant = getattr(args, "new_tokenizer", False)
    if args.tokenizer and init_tok and init_tok.is_file() and not meant:
        if file_digest(args.tokenizer) != file_digest(init_tok):
            problems.add(f"--tokenizer {args.tokenizer} is not the tokenizer stage 1 trained with "
                         f"({init_tok}: the files differ): its ids would mean other words to the "
                         "model. Leave --tokenizer out to inherit stage 1's, or add "
                         "--new-tokenizer if a new one is meant")
    try:
        vocab = Tokenizer(tok_file).vocab_size
    except (LlavaMinError, OSError, RuntimeError) as e:
        problems.add(f"tokenizer {tok_file}: not a sentencepiece model ({e})")
        return
    llm = _llm_vocab(args)
    if llm is not None and vocab > llm:
        problems.add(f"the tokenizer {tok_file} has {vocab} pieces but the LLM's vocab_size is "
                     f"{llm}: ids past the embedding table would crash. Use a tokenizer that "
                     "fits, or an LLM config with vocab_size >= the tokenizer's")


def changes(args, init_dir, inherited: dict) -> str:
    """After inheriting: each setting given on the command line that differs from stage 1's, as
    "image_size 56 (stage 1: 336)"; the tokenizer by its bytes."""
    file = Path(init_dir) / "args.json"
    try:
        saved = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        saved = {}
    changed = []
    for key in inherited:
        if key == "tokenizer":
            stage1 = Path(init_dir) / "tokenizer.model"
            if file_digest(args.tokenizer) != file_digest(stage1):
                changed.append(f"tokenizer {args.tokenizer} (stage 1: {stage1}; --new-tokenizer)")
        elif key in saved and saved[key] != getattr(args, key):
            changed.append(f"{key} {getattr(args, key)} (stage 1: {saved[key]})")
    return "changed from stage 1: " + (", ".join(changed) or "nothing")
