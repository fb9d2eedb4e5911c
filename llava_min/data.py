"""LLaVA-format samples, XTuner's internlm2_chat template and labels, the data set and its collate function.

Samples (LLaVA-Pretrain 558K, llava_v1_5_mix665k): a JSON list or a JSONL file of

    {"id": "000000033471" or 33471, "image": "coco/train2017/000000033471.jpg",      (optional)
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Rules that `find_problems` checks for every sample before any training (all bad samples are reported
at once, with index, id, file and line):
  * an "id" (a string, or an integer, which is turned into a string as XTuner does);
  * "conversations": a non-empty list of {"from": "human"|"gpt", "value": str}, alternating and starting
    with human, ending with gpt (XTuner would silently drop a leading gpt or trailing human message);
  * an image sample has exactly one "<image>" tag, in the first human turn (at its start or end, as in
    LLaVA's data), and its "image" file exists under the image folder. A tag without an "image" field,
    or an "image" field without a tag, is an error rather than a guess: the first would feed the model a
    placeholder with no picture, the second a picture the text never refers to;
  * a text-only sample has no "image" field (or null) and no tag.

Template and labels (xtuner/dataset/utils.py `encode_fn`, xtuner/utils/templates.py; `encode_conversation`): XTuner's llava_map_fn
moves the tag to the front of its human turn as "<image>\\n", then for every turn

    [<s>]  <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n  ⟦{answer}<|im_end|>⟧  \\n

with <s> only at position 0, the optional system block `<|im_start|>system\\n{system}<|im_end|>\\n` before the
first turn, and only ⟦...⟧ supervised. Each part is encoded on its own, exactly as XTuner's encode_fn
calls tokenizer.encode, so the label mask always lines up with the tokens. Chat-token names are parsed in
the template only: message text is content, so a "<|im_end|>" typed in a message stays text (here alone
we differ from XTuner, whose tokenizer would end the turn there). The image placeholder is one
IMAGE_TOKEN_INDEX (-200) that the model replaces by `image_tokens` patch features; the sequence is cut
at `max_length` LLM positions, an image counting `image_tokens` (1 = XTuner's count).

A sample whose first answer starts at or beyond max_length has nothing to learn from; `LLaVADataset`
finds these at start-up (cheaply: a byte-length bound, and only near the limit by encoding the first
prompt), drops them and counts them in its report. Longer samples that keep a supervised token are cut
at the end; each item says whether it was (`truncated`), and `collate` counts them per batch.

Command line:
    python -m llava_min.data check --data FILE [FILE ...] --image-folder DIR [--decode --num-workers N]
                                   [--tokenizer tok.model --max-length N --image-tokens K]
    python -m llava_min.data show --data FILE [FILE ...] --index N [--tokenizer tok.model] [--image-folder DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import numpy as np

# torch, and image.py which needs it, are imported inside the functions that make tensors, so that `check`,
# `show` and tokenizer training start in a fraction of a second.
from . import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .tokenizer import CHAT_TOKENS, Tokenizer

# XTuner PROMPT_TEMPLATE.internlm2_chat (xtuner/utils/templates.py), exact strings.
SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
SUFFIX = "<|im_end|>"  # SUFFIX_AS_EOS: the answer ends with <|im_end|>, supervised, and no </s>
SEP = "\n"             # after each answer, not supervised
IMAGE_TAG = "<image>"
ROLES = ("human", "gpt")
MAX_REPORTED = 20      # bad samples listed in full; the rest are counted

_TEMPLATE_SPLIT = re.compile("(" + "|".join(map(re.escape, CHAT_TOKENS)) + ")")


class DataError(ValueError):
    """A data file or sample cannot be used; the message names the file, line, sample index and id."""


# --------------------------------------------------------------------------------------------------
# Reading files

def load_samples(files) -> list[dict]:
    """Samples of LLaVA JSON (a list) and JSONL files, in order. Integer ids become strings.

    Each sample gets "_where" ("data/x.jsonl line 13", "data/x.json item 12") for error messages.
    Unreadable files, invalid JSON and entries that are not objects raise DataError, all listed at once.
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    samples, errors = [], []
    for file in map(os.fspath, files):
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read data file {file}: {e}") from e
        if file.endswith(".jsonl"):
            entries = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        entries.append((f"{file} line {number}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        errors.append(f"{file} line {number}: not valid JSON ({e.msg} at column {e.colno})")
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                hint = "; one JSON object per line? then name the file .jsonl" if e.msg == "Extra data" else ""
                raise DataError(f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}){hint}") from e
            if not isinstance(data, list):
                raise DataError(f"{file}: a JSON list of samples expected, found a {type(data).__name__}")
            entries = [(f"{file} item {k}", entry) for k, entry in enumerate(data)]
        for where, entry in entries:
            if not isinstance(entry, dict):
                errors.append(f"{where}: a sample must be a JSON object, found {_short(entry)}")
                continue
            entry["_where"] = where
            samples.append(with_str_id(entry))
    if errors:
        raise DataError(_listing(f"{len(errors)} unreadable entries in {', '.join(map(os.fspath, files))}", errors))
    return samples


def with_str_id(sample: dict) -> dict:
    """The sample with an integer id turned into a string, as XTuner's LLaVADataset does (a copy if changed)."""
    ident = sample.get("id")
    return {**sample, "id": str(ident)} if isinstance(ident, int) and not isinstance(ident, bool) else sample


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _listing(title: str, lines: list[str]) -> str:
    more = f"\n  ... and {len(lines) - MAX_REPORTED} more" if len(lines) > MAX_REPORTED else ""
    return title + ":\n" + "\n".join("  " + line for line in lines[:MAX_REPORTED]) + more


def describe(sample: dict, index: int, image_folder=None) -> str:
    """'sample 12 (id '33471', data/x.json item 12, image /img/coco/1.jpg)' for error messages."""
    fields = [f"id {sample.get('id')!r}", sample.get("_where", "given in memory")]
    if isinstance(sample.get("image"), str):
        fields.append(f"image {image_path(sample, image_folder)}")
    return f"sample {index} ({', '.join(fields)})"


def image_path(sample: dict, image_folder=None) -> str:
    return os.path.join(image_folder, sample["image"]) if image_folder else sample["image"]


# --------------------------------------------------------------------------------------------------
# Validation: cheap, every sample, all problems at once

def sample_problems(sample: dict) -> list[str]:
    """What is wrong with one sample's structure (see the module docstring), as short phrases."""
    problems = []
    if "id" not in sample:
        problems.append("no 'id'")
    elif not isinstance(sample["id"], str):
        problems.append(f"'id' is {_short(sample['id'])}, not a string or an integer")
    conversations = sample.get("conversations")
    tags, roles = 0, []
    if conversations is None:
        problems.append("no 'conversations'")
    elif not isinstance(conversations, list):
        problems.append(f"'conversations' is a {type(conversations).__name__}, not a list")
    elif not conversations:
        problems.append("'conversations' is empty")
    else:
        for k, message in enumerate(conversations):
            if not (isinstance(message, dict) and isinstance(message.get("from"), str)
                    and isinstance(message.get("value"), str)):
                problems.append(_message_problem(k, message))
                continue
            roles.append(message["from"])
            n = message["value"].count(IMAGE_TAG)
            tags += n
            if n and k != 0:  # so the image always precedes the first answer, and is never cut alone
                problems.append(f"{IMAGE_TAG} in conversations[{k}] ({message['from']}); it belongs in the "
                                f"first human turn")
        if len(roles) == len(conversations):  # roles are only meaningful once every message is well formed
            for k, role in enumerate(roles):
                if role != ROLES[k % 2]:
                    problems.append(f"conversations[{k}] is from {role!r} where {ROLES[k % 2]!r} was expected "
                                    f"(turns alternate human, gpt, ...)")
                    break
            else:
                if roles[-1] != "gpt":
                    problems.append("the last human turn has no gpt answer")
    image = sample.get("image")
    if image is not None and not (isinstance(image, str) and image):
        problems.append(f"'image' is {_short(image)}, not a file name (one image per sample)")
    if tags > 1:
        problems.append(f"{tags} {IMAGE_TAG} tags; a sample holds one image, tagged once")
    elif tags == 1 and image is None:
        problems.append(f"{IMAGE_TAG} in the text but no 'image' field; add the image or remove the tag")
    elif tags == 0 and image is not None:
        problems.append(f"an 'image' field but no {IMAGE_TAG} tag; put '{IMAGE_TAG}\\n' at the start of the "
                        f"first human turn, or drop the 'image' field for a text-only sample")
    return problems


def _message_problem(k: int, message) -> str:
    if not isinstance(message, dict):
        return f"conversations[{k}] is {_short(message)}, not {{\"from\": ..., \"value\": ...}}"
    wrong = [key for key in ("from", "value") if not isinstance(message.get(key), str)]
    return "; ".join(f"conversations[{k}][{key!r}] is {_short(message.get(key))}, not a string" for key in wrong)


class _FileIndex:
    """File existence by listing each folder once: one listdir per folder instead of one stat per sample
    (mix665k has 665k samples in 6 image folders; stats on a network file system take minutes)."""

    def __init__(self):
        self.folders: dict[str, set[str] | None] = {}

    def exists(self, path: str) -> bool:
        folder, name = os.path.split(path)
        if folder not in self.folders:
            try:
                self.folders[folder] = set(os.listdir(folder or "."))
            except OSError:
                self.folders[folder] = None
        names = self.folders[folder]
        return names is not None and name in names


def find_problems(samples: list[dict], image_folder=None, check_files: bool = True) -> dict[int, str]:
    """{index: 'what is wrong'} for every bad sample: structure, and (check_files) missing image files."""
    bad = {}
    files = _FileIndex()
    for index, sample in enumerate(samples):
        problems = sample_problems(sample)
        if check_files and not problems and sample.get("image") is not None:
            path = image_path(sample, image_folder)
            if not files.exists(path):
                folder_hint = "" if image_folder else "; no --image-folder was given"
                problems.append(f"image file {path} does not exist{folder_hint}")
        if problems:
            bad[index] = "; ".join(problems)
    return bad


def problem_report(samples: list[dict], bad: dict[int, str], image_folder=None) -> str:
    sources = sorted({s.get("_where", "").rsplit(" ", 2)[0] for s in samples} - {""}) or ["samples given in memory"]
    lines = [f"{describe(samples[i], i, image_folder)}: {what}" for i, what in bad.items()]
    return _listing(f"{len(bad)} of {len(samples)} samples in {', '.join(sources)} are bad; fix or remove them "
                    f"(or drop them with skip_bad / --skip-bad-samples)", lines)


def validate(samples: list[dict], image_folder=None, check_files: bool = True) -> None:
    """Raise DataError listing every bad sample (the first 20 in full, then a count); else return None."""
    bad = find_problems(samples, image_folder, check_files)
    if bad:
        raise DataError(problem_report(samples, bad, image_folder))


# --------------------------------------------------------------------------------------------------
# The internlm2_chat template and XTuner's labels

def llava_turns(conversations: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs as XTuner's llava_map_fn builds them
    (xtuner/dataset/map_fns/dataset_map_fns/llava_map_fn.py): leading gpt messages dropped, the image tag
    moved to the front of its human message as "<image>\\n", consecutive human messages joined, a trailing
    human message dropped."""
    messages = list(conversations)
    while messages and messages[0]["from"] == "gpt":
        messages.pop(0)
    turns, question = [], ""
    for message in messages:
        value = message["value"]
        if message["from"] == "human":
            if IMAGE_TAG in value:
                value = (IMAGE_TAG + "\n" + value.replace(IMAGE_TAG, "").strip()).strip()
            question += value
        elif message["from"] == "gpt":
            turns.append((question, value))
            question = ""
        else:
            raise DataError(f"a message from {message['from']!r}; LLaVA conversations use 'human' and 'gpt'")
    return turns


def _encode_template(tok: Tokenizer, template: str, fields: dict, with_image: bool = False) -> list[int]:
    """ids of template.format(**fields), with chat-token names parsed in the template only.

    The template is split at its chat tokens before the fields go in, so a name typed in a message stays
    text; each piece of text between them, template words and message together, is one sentencepiece
    call, exactly the strings XTuner's tokenizer.encode sees. With with_image, "<image>" splits the text
    too and becomes IMAGE_TOKEN_INDEX, as in XTuner's encode_fn.
    """
    ids = []
    for k, part in enumerate(_TEMPLATE_SPLIT.split(template)):
        if k % 2:  # odd pieces of re.split with a group: the chat-token names
            ids.append(tok.special_ids[part])
            continue
        chunks = part.format(**fields).split(IMAGE_TAG) if with_image else [part.format(**fields)]
        for j, chunk in enumerate(chunks):
            if j:
                ids.append(IMAGE_TOKEN_INDEX)
            ids += tok.encode(chunk, special=False)
    return ids


def _prompt_template(system: str | None, first_turn: bool) -> str:
    # XTuner's template_map_fn puts SYSTEM before a turn's instruction when that turn has a system
    # text; the map functions that set one (openai_map_fn, ...) set it on the first turn only.
    return (SYSTEM if system and first_turn else "") + INSTRUCTION


def _encode_full(tok: Tokenizer, conversations, system: str | None) -> tuple[list[int], list[int]]:
    """XTuner's encode_fn for internlm2_chat, before truncation."""
    if system and IMAGE_TAG in system:
        raise DataError(f"the system prompt contains {IMAGE_TAG!r}; images belong in a human turn")
    ids, labels = [tok.bos_id], [IGNORE_INDEX]  # one BOS: SUFFIX_AS_EOS means no turn asks for another
    for k, (question, answer) in enumerate(llava_turns(conversations)):
        prompt = _encode_template(tok, _prompt_template(system, k == 0), {"system": system, "input": question},
                                  with_image=True)
        output = _encode_template(tok, "{output}" + SUFFIX, {"output": answer})
        sep = _encode_template(tok, SEP, {})
        ids += prompt + output + sep
        labels += [IGNORE_INDEX] * len(prompt) + output + [IGNORE_INDEX] * len(sep)
    return ids, labels


def _positions(ids: list[int], image_tokens: int) -> int:
    """LLM sequence length of `ids`: each image placeholder becomes image_tokens positions."""
    return len(ids) + ids.count(IMAGE_TOKEN_INDEX) * (image_tokens - 1)


def _truncate(ids: list[int], labels: list[int], max_length: int, image_tokens: int):
    """Cut at max_length LLM positions; an image that does not fit whole is cut with everything after it."""
    if _positions(ids, image_tokens) <= max_length:
        return ids, labels
    used = 0
    for cut, token in enumerate(ids):
        used += image_tokens if token == IMAGE_TOKEN_INDEX else 1
        if used > max_length:
            return ids[:cut], labels[:cut]
    raise AssertionError("unreachable: the sequence was longer than max_length")


def encode_conversation(tok: Tokenizer, conversations: list[dict], max_length: int = 2048,
                        system: str | None = None, image_tokens: int = 1) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a LLaVA conversation, identical to XTuner's for the internlm2_chat template.

    input_ids hold one IMAGE_TOKEN_INDEX per image; labels are IGNORE_INDEX except each answer and its
    <|im_end|>. The result fits max_length LLM positions, counting image_tokens per image (1 = XTuner).
    It may have no supervised label left (a prompt longer than max_length); LLaVADataset drops those.
    """
    return _truncate(*_encode_full(tok, conversations, system), max_length, image_tokens)


def first_answer_fits(tok: Tokenizer, conversations: list[dict], max_length: int, system: str | None = None,
                      image_tokens: int = 1) -> bool:
    """Whether encode_conversation(...) keeps at least one supervised token, computed cheaply.

    The first answer (at least its <|im_end|>) is supervised and fits iff it starts before max_length.
    Its start is bounded without tokenizing: every sentencepiece token covers at least one byte of text
    (byte fallback), a chat-token name (10+ bytes) is one token, and the 7-byte image tag becomes
    image_tokens positions. Only a prompt near the limit is encoded to decide exactly.
    """
    turns = llava_turns(conversations)
    if not turns:
        return False
    template = _prompt_template(system, True)
    fields = {"system": system, "input": turns[0][0]}
    text = template.format(**fields)
    bound = 1 + len(text.encode("utf-8")) + (image_tokens if IMAGE_TAG in text else 0)
    if bound < max_length:
        return True
    return 1 + _positions(_encode_template(tok, template, fields, with_image=True), image_tokens) < max_length


def estimate_length(sample: dict, image_tokens: int) -> int:
    """Cheap sequence-length estimate for the length-grouped sampler; negative for text-only samples.

    About 4 characters per token, 5 template tokens per message, image_tokens per image (XTuner's
    modality_length has the same sign convention; only the order of the estimates matters)."""
    messages = sample["conversations"]
    text = sum(len(m["value"]) for m in messages) // 4 + 5 * len(messages) + 1
    return text + image_tokens if sample.get("image") is not None else -text


# --------------------------------------------------------------------------------------------------
# Data set and collate

class PackedSamples:
    """A read-only list of sample dicts kept as one byte buffer of JSON plus offsets.

    A Python list of 665k dicts is ~1 GB of small objects, and every loader worker that merely reads it
    touches their reference counts, so copy-on-write after fork slowly copies the whole list into each
    worker (pytorch/pytorch#13246); with spawn it is pickled object by object. Two numpy arrays are
    shared for free and pickle in one piece.
    """

    def __init__(self, samples: list[dict]):
        blobs = [json.dumps(s, ensure_ascii=False).encode("utf-8") for s in samples]
        self.offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        self.buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range (data set of {len(self)})")
        i %= len(self)
        return json.loads(self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes())


class LLaVADataset:
    """LLaVA samples -> (input_ids, labels, pixel_values), tokenized and decoded lazily, per item.

    data          a file, a list of files (JSON / JSONL), or a list of sample dicts (load_samples' output)
    tokenizer     a Tokenizer or the path of a sentencepiece model
    image_folder  image paths in the data are relative to it
    image_size, image_mode   ViT input: size x size, "pad" (LLaVA-1.5) or "crop" (DINOv2), see image.py
    max_length    cap on LLM positions, image_tokens per image included
    image_tokens  positions one image takes in the LLM (the ViT's patch count: 256 for 224 px / patch 14)
    system        optional system prompt before the first turn
    skip_bad      drop (and count) bad samples instead of raising DataError listing them
    check_files   check at start-up that every image file exists

    Start-up does only cheap work: validation, the no-supervision check, length estimates. `report()` says
    what was kept and dropped; `stats` holds the counts. Items are deterministic: no randomness anywhere.
    """

    def __init__(self, data, tokenizer, image_folder=None, *, image_size: int = 336, image_mode: str = "pad",
                 max_length: int = 2048, image_tokens: int = 1, system: str | None = None,
                 skip_bad: bool = False, check_files: bool = True):
        if isinstance(data, (list, tuple)) and data and all(isinstance(s, dict) for s in data):
            samples = [with_str_id(s) for s in data]
        else:
            samples = load_samples(data)
        if not samples:
            raise DataError(f"no samples in {data!r}")
        if system and IMAGE_TAG in system:
            raise DataError(f"the system prompt contains {IMAGE_TAG!r}; images belong in a human turn")
        if max_length <= 0 or image_tokens <= 0:
            raise DataError(f"max_length ({max_length}) and image_tokens ({image_tokens}) must be positive")
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        self.image_folder = os.fspath(image_folder) if image_folder is not None else None
        self.image_size, self.image_mode = image_size, image_mode
        self.max_length, self.image_tokens, self.system = max_length, image_tokens, system

        bad = find_problems(samples, self.image_folder, check_files)
        if bad and not skip_bad:
            raise DataError(problem_report(samples, bad, self.image_folder))
        kept, self.lengths, unsupervised = [], [], []
        for index, sample in enumerate(samples):
            if index in bad:
                continue
            if not first_answer_fits(self.tokenizer, sample["conversations"], max_length, system, image_tokens):
                unsupervised.append(describe(sample, index, self.image_folder))
                continue
            kept.append(sample)
            self.lengths.append(estimate_length(sample, image_tokens))
        self._dropped = [f"{describe(samples[i], i, self.image_folder)}: {what}" for i, what in bad.items()]
        self._dropped += [f"{d}: the first answer starts beyond max_length {max_length}" for d in unsupervised]
        if not kept:
            raise DataError(_listing(f"none of the {len(samples)} samples is usable; fix the data or raise "
                                     f"--max-length", self._dropped))
        self.samples = PackedSamples(kept)
        with_image = sum(1 for n in self.lengths if n > 0)
        self.stats = {"loaded": len(samples), "used": len(kept), "with_image": with_image,
                      "text_only": len(kept) - with_image, "dropped_bad": len(bad),
                      "dropped_no_supervision": len(unsupervised)}

    def report(self) -> str:
        """The start-up report: what is used, what was dropped and why (the first 20 named)."""
        s = self.stats
        text = (f"data: {s['used']} of {s['loaded']} samples used ({s['with_image']} with an image, "
                f"{s['text_only']} text-only); dropped {s['dropped_bad']} bad, {s['dropped_no_supervision']} "
                f"with no supervised token within max_length {self.max_length} "
                f"(image = {self.image_tokens} positions)")
        return _listing(text, self._dropped) if self._dropped else text

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        import torch

        sample = self.samples[i]
        full_ids, full_labels = _encode_full(self.tokenizer, sample["conversations"], self.system)
        ids, labels = _truncate(full_ids, full_labels, self.max_length, self.image_tokens)
        assert any(label != IGNORE_INDEX for label in labels), f"sample {i}: start-up should have dropped it"
        pixel_values, path = None, None
        if sample.get("image") is not None:
            from . import image as image_lib

            path = image_path(sample, self.image_folder)
            try:
                # uint8: the model normalises on its device (a quarter of the bytes between processes)
                pixel_values = image_lib.to_pixels(image_lib.load_image(path), self.image_size, self.image_mode)
            except image_lib.ImageError as e:
                raise DataError(f"{describe(sample, i, self.image_folder)}: {e}") from e
        return {"index": i, "id": sample["id"], "input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "pixel_values": pixel_values, "image": path,
                "truncated": len(ids) < len(full_ids)}


def collate(samples: list[dict], pad_id: int = 0, shared: bool = False) -> dict:
    """Right-pad a list of LLaVADataset items into a batch (XTuner's default_collate_fn).

    The attention mask comes from the lengths, not from pad_id, which may equal a real token (</s>).
    pixel_values stacks the images of all rows in row order; image_counts says how many each row has.
    shared=True stacks the pixels straight into shared memory, for a batch built in a loader worker: sending
    it to the trainer then copies nothing (torch's own default_collate does the same in its workers).
    """
    import torch

    if not samples:
        raise DataError("collate got an empty batch")
    lengths = [len(s["input_ids"]) for s in samples]
    batch, longest = len(samples), max(lengths)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    for row, (sample, n) in enumerate(zip(samples, lengths)):
        input_ids[row, :n] = sample["input_ids"]
        labels[row, :n] = sample["labels"]
        attention_mask[row, :n] = 1
    image_counts = (input_ids == IMAGE_TOKEN_INDEX).sum(dim=1)  # (B,)
    images = []
    for row, sample in enumerate(samples):
        has = sample["pixel_values"] is not None
        if int(image_counts[row]) != int(has):
            raise DataError(f"sample {sample['index']} (id {sample['id']!r}): {int(image_counts[row])} image "
                            f"placeholders but {int(has)} images")
        if has:
            images.append(sample["pixel_values"])
    if len({tuple(x.shape) for x in images}) > 1:
        shapes = {s["id"]: tuple(s["pixel_values"].shape) for s in samples if s["pixel_values"] is not None}
        raise DataError(f"images of one batch differ in shape: {shapes}; use one --image-size for all")
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": _stack(images, shared) if images else None, "image_counts": image_counts,
            "ids": [s["id"] for s in samples], "indices": [s["index"] for s in samples],
            "num_truncated": sum(bool(s.get("truncated")) for s in samples)}


def _stack(tensors: list, shared: bool):
    import torch

    if not shared:
        return torch.stack(tensors)
    from .loader import shared_empty  # in a loader worker: a reused shared-memory slot

    return torch.stack(tensors, out=shared_empty((len(tensors), *tensors[0].shape), tensors[0].dtype))


# --------------------------------------------------------------------------------------------------
# Command line: check and show

def _decode_chunk(items: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(index, error) for each image in `items` that does not decode fully (runs in a worker process)."""
    from . import image as image_lib

    errors = []
    for index, path in items:
        try:
            image_lib.load_image(path)
        except image_lib.ImageError as e:
            errors.append((index, str(e)))
    return errors


def decode_images(items: list[tuple[int, str]], num_workers: int = 0, chunk: int = 16) -> dict[int, str]:
    """{index: error} for the images in `items` ((index, path) pairs) that do not decode.

    Workers run in a ProcessPoolExecutor, which, unlike multiprocessing.Pool, notices a worker that dies
    (the OOM killer's SIGKILL, a segfault in a decoder) and fails the pending work instead of waiting for
    ever. At most two chunks per worker are queued, so the error can name the few images in flight.
    """
    chunks = iter([items[k:k + chunk] for k in range(0, len(items), chunk)])
    if num_workers <= 0:
        return {i: e for c in chunks for i, e in _decode_chunk(c)}
    errors = {}
    with ProcessPoolExecutor(num_workers) as pool:
        pending = {}
        try:
            while True:
                while len(pending) < 2 * num_workers and (c := next(chunks, None)) is not None:
                    pending[pool.submit(_decode_chunk, c)] = c
                if not pending:
                    return errors
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    errors.update(future.result())
                    del pending[future]
        except BrokenProcessPool as e:
            paths = [p for c in pending.values() for _, p in c]
            raise DataError(f"an image decoding worker died abruptly (killed by the OOM killer, or a crash in "
                            f"an image decoder) while decoding one of these {len(paths)} images: "
                            f"{', '.join(paths)}; rerun with --num-workers 0 to find the file, or give the "
                            f"machine more memory") from e


def check(files, image_folder=None, decode: bool = False, num_workers: int = 0, tokenizer=None,
          max_length: int = 2048, image_tokens: int = 1, system: str | None = None) -> str:
    """`python -m llava_min.data check`: validate everything, optionally decode every image and count the
    samples that max_length truncates or leaves unsupervised (which needs encoding them all).
    Raises DataError listing every problem; returns a one-line summary."""
    samples = load_samples(files)
    bad = find_problems(samples, image_folder)
    if decode:
        items = [(i, image_path(s, image_folder)) for i, s in enumerate(samples)
                 if i not in bad and s.get("image") is not None]
        bad.update(decode_images(items, num_workers))
        bad = dict(sorted(bad.items()))
    if bad:
        raise DataError(problem_report(samples, bad, image_folder))
    with_image = sum(1 for s in samples if s.get("image") is not None)
    summary = (f"{len(samples)} samples OK ({with_image} with an image, {len(samples) - with_image} text-only"
               f"{', every image decodes' if decode else ''})")
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        truncated = unsupervised = 0
        for s in samples:
            full_ids, full_labels = _encode_full(tok, s["conversations"], system)
            ids, labels = _truncate(full_ids, full_labels, max_length, image_tokens)
            if all(label == IGNORE_INDEX for label in labels):
                unsupervised += 1
            elif len(ids) < len(full_ids):
                truncated += 1
        summary += (f"; at max_length {max_length} (image = {image_tokens} positions): {truncated} cut short, "
                    f"{unsupervised} with no supervised token (dropped in training)")
    return summary


def show(files, index: int, tokenizer=None, image_folder=None, max_length: int = 2048, image_tokens: int = 1,
         system: str | None = None) -> str:
    """`python -m llava_min.data show`: one sample rendered as the model sees it, ⟦supervised⟧ marked."""
    samples = load_samples(files)
    if not -len(samples) <= index < len(samples):
        raise DataError(f"--index {index} is out of range: {len(samples)} samples in {', '.join(map(str, files))}")
    index %= len(samples)
    sample = samples[index]
    lines = [describe(sample, index, image_folder)]
    problems = sample_problems(sample)
    if problems:
        return "\n".join(lines + [f"bad: {'; '.join(problems)}", json.dumps(sample, ensure_ascii=False, indent=1)])
    if sample.get("image") is not None:
        from . import image as image_lib

        try:
            width, height = image_lib.load_image(image_path(sample, image_folder)).size
            lines.append(f"image: {width}x{height} px")
        except image_lib.ImageError as e:
            lines.append(f"image: {e}")
    if tokenizer is None:
        lines.append(json.dumps(sample["conversations"], ensure_ascii=False, indent=1))
        lines.append("(give --tokenizer to see the tokens and labels)")
        return "\n".join(lines)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    full_ids, _ = _encode_full(tok, sample["conversations"], system)
    ids, labels = encode_conversation(tok, sample["conversations"], max_length, system, image_tokens)
    supervised = sum(label != IGNORE_INDEX for label in labels)
    lines.append(f"tokens: {len(ids)} ids, {_positions(ids, image_tokens)} LLM positions (image = {image_tokens}); "
                 f"{supervised} supervised" + (f"; truncated from {len(full_ids)} ids at max_length {max_length}"
                                               if len(ids) < len(full_ids) else ""))
    # Runs of equal supervision, decoded together; ⟦...⟧ marks what the loss sees, ↵ a newline.
    runs: list[tuple[bool | None, list[int]]] = []  # (supervised, ids); None: the image placeholder
    for token, label in zip(ids, labels):
        supervised = None if token == IMAGE_TOKEN_INDEX else label != IGNORE_INDEX
        if runs and runs[-1][0] == supervised and supervised is not None:
            runs[-1][1].append(token)
        else:
            runs.append((supervised, [token]))
    text = []
    for supervised, run in runs:
        if supervised is None:
            text.append(f"[image: {image_tokens} positions]")
            continue
        piece = tok.decode(run).replace("\n", "↵\n")  # <s> decodes to nothing; it is printed first
        text.append(f"⟦{piece}⟧" if supervised else piece)
    lines.append("-" * 40 + "\n" + "<s>" * (ids[:1] == [tok.bos_id]) + "".join(text))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m llava_min.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("check", "validate every sample (and decode every image with --decode)"),
                            ("show", "print one sample as the model sees it, supervised tokens marked")):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--data", nargs="+", required=True, help="LLaVA JSON (a list) or JSONL files")
        c.add_argument("--image-folder", default=None)
        c.add_argument("--tokenizer", default=None, help="sentencepiece model (check: also count truncation)")
        c.add_argument("--max-length", type=int, default=2048)
        c.add_argument("--image-tokens", type=int, default=1, help="LLM positions per image (ViT patches)")
        c.add_argument("--system", default=None)
        if name == "check":
            c.add_argument("--decode", action="store_true", help="decode every image, in worker processes")
            c.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
        else:
            c.add_argument("--index", type=int, required=True, help="sample number in the data (0-based)")
    args = p.parse_args(argv)
    try:
        if args.command == "check":
            print(check(args.data, args.image_folder, args.decode, args.num_workers, args.tokenizer,
                        args.max_length, args.image_tokens, args.system))
        else:
            print(show(args.data, args.index, args.tokenizer, args.image_folder, args.max_length,
                       args.image_tokens, args.system))
    except ValueError as e:  # DataError, TokenizerError: the message names the culprit and the fix
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
