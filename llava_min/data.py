"""LLaVA-format samples -> XTuner's internlm2_chat ids and labels; the data set, its start-up checks, collate.

Read `encode_conversation` (the template, exactly XTuner's), `LLaVADataset` (what start-up checks and drops,
cheaply enough for 665K samples; the rules: `sample_problems`), then `collate`. A sample, in a JSON list or JSONL:
    {"id": "000000033471" or 33471, "image": "coco/train2017/000000033471.jpg",      (optional)
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A cat."}, ...]}
"""
from __future__ import annotations

import json
import os
import re
from array import array
from operator import itemgetter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaMinError
from .image import IMAGENET, Preprocessing, load_image, to_pixels
from .loader import shared_empty
from .tokenizer import CHAT_TOKEN_SPLIT, Tokenizer

# XTuner PROMPT_TEMPLATE.internlm2_chat (xtuner/utils/templates.py), exact strings.
SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
SUFFIX = "<|im_end|>"  # SUFFIX_AS_EOS: the answer ends with <|im_end|>, supervised, and no </s>
SEP = "\n"             # after each answer, not supervised
IMAGE_TAG = "<image>"
ROLES = ("human", "gpt")
MAX_REPORTED = 20      # bad samples listed in full; the rest are counted

_WHITESPACE = re.compile(r"[ \t\n\r]*")  # what JSON allows between values
_VALUE = itemgetter("value")
_WORDS = re.compile(r"(?<=[^\s\u2581])(?= )")  # before each space that follows a non-space: see TokenCounter


# Samples as raw JSON bytes

class Samples:
    """The samples of JSON-list and JSONL files (or of a list of dicts) as the files' bytes plus four numbers per
    sample (file, item or line number, start and end byte), parsed again when read. 665K dicts would be ~2.5 GB
    of small objects that copy-on-write slowly copies into every forked loader worker as it touches their reference
    counts (pytorch/pytorch#13246); a few bytes objects and one array are shared as they are, and pickle whole."""

    def __init__(self, data):
        if isinstance(data, (list, tuple)) and data and all(isinstance(s, dict) for s in data):
            # In memory: one JSONL document, so that it takes the same path as a file.
            self.sources = [("given in memory", "\n".join(json.dumps(s, ensure_ascii=False) for s in data))]
        else:
            self.sources = [(os.fspath(f), None) for f in ([data] if isinstance(data, (str, os.PathLike)) else data)]
        self.buffers: list[bytes] = []
        self.labels: list[str] = []    # per file: "x.json item {}", "x.jsonl line {}", "given in memory"
        self.spans = array("q")        # per sample: file, number, start, end (byte offsets in its buffer)

    def scan(self) -> Iterator[dict]:
        """Each sample as it is parsed (checked by the caller in the same pass), its id made a string as XTuner does.
        Unreadable files raise at once; invalid JSON lines and non-objects after the last sample, all listed."""
        errors = []
        for name, text in self.sources:
            in_memory = text is not None
            jsonl = in_memory or name.endswith(".jsonl")
            try:
                raw = text.encode() if in_memory else Path(name).read_bytes()
                if not jsonl:
                    text = raw.decode("utf-8")  # the json module parses str only
            except (OSError, UnicodeDecodeError) as e:
                raise LlavaMinError(f"cannot read data file {name}: {e}") from e
            file = len(self.buffers)
            self.buffers.append(raw)
            escaped = name.replace("{", "{{").replace("}", "}}")
            self.labels.append(name if in_memory else f"{escaped} {'line' if jsonl else 'item'} {{}}")
            entries = _jsonl_entries(raw, errors, self.labels[-1]) if jsonl else _json_list_entries(text, name)
            for number, start, end, entry in entries:
                if not isinstance(entry, dict):
                    errors.append(f"{self.labels[-1].format(number)}: a sample must be a JSON object, found "
                                  f"{_short(entry)}")
                    continue
                self.spans.extend((file, number, start, end))
                ident = entry.get("id")
                yield {**entry, "id": str(ident)} if type(ident) is int else entry  # not bool, an int subclass
        if errors:
            names = ", ".join(name for name, _ in self.sources)
            raise LlavaMinError(_listing(f"{len(errors)} unreadable entries in {names}", errors))

    def keep(self, indices) -> Samples:
        """The samples at `indices` (sharing the bytes)."""
        kept = Samples([])
        kept.sources, kept.buffers, kept.labels = self.sources, self.buffers, self.labels
        kept.spans = array("q", np.frombuffer(self.spans, np.int64).reshape(-1, 4)[indices].tobytes())
        return kept

    def __len__(self) -> int:
        return len(self.spans) // 4

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        file, _, start, end = self.spans[4 * i:4 * i + 4]
        sample = json.loads(self.buffers[file][start:end])
        return {**sample, "id": str(sample["id"])} if type(sample.get("id")) is int else sample

    def describe(self, i: int, image_folder=None) -> str:
        """'sample 12 (id '33471', data/x.json item 12, image /img/coco/1.jpg)' for error messages."""
        sample, (file, number) = self[i], self.spans[4 * i:4 * i + 2]
        fields = [f"id {sample.get('id')!r}", self.labels[file].format(number)]
        if isinstance(sample.get("image"), str):
            fields.append(f"image {image_path(sample, image_folder)}")
        return f"sample {i} ({', '.join(fields)})"


def _jsonl_entries(raw: bytes, errors: list, label: str):
    """(line number, start, end, entry) per non-blank line; invalid lines go to `errors`."""
    start, number = 0, 0
    while start < len(raw):
        end = raw.find(b"\n", start)
        end = len(raw) if end < 0 else end
        number += 1
        if raw[start:end].strip():
            try:
                yield number, start, end, json.loads(raw[start:end])
            except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
                errors.append(f"{label.format(number)}: not valid JSON ({getattr(e, 'msg', e)} at column "
                              f"{getattr(e, 'colno', '?')})")
        start = end + 1


def _json_list_entries(text: str, name: str):
    """(item number, start byte, end byte, entry) per element of a JSON list, by json's scanner (json.load's speed)."""
    decode = json.JSONDecoder().raw_decode
    pos = _WHITESPACE.match(text).end()
    try:
        if not text.startswith("[", pos):
            data = json.loads(text)  # not a list: let json say why, or name what it is
            raise LlavaMinError(f"{name}: a JSON list of samples expected, found a {type(data).__name__}")
        # Character offsets equal byte offsets in ASCII text (str.isascii is O(1)); else count the bytes.
        ascii_text, last, byte = text.isascii(), 0, 0
        pos = _WHITESPACE.match(text, pos + 1).end()
        number, more = 0, not text.startswith("]", pos)
        while more:
            entry, end = decode(text, pos)
            if ascii_text:
                yield number, pos, end, entry
            else:
                start = byte + len(text[last:pos].encode())
                byte, last = start + len(text[pos:end].encode()), end
                yield number, start, byte, entry
            number += 1
            pos = _WHITESPACE.match(text, end).end()
            more = text.startswith(",", pos)
            if more:
                pos = _WHITESPACE.match(text, pos + 1).end()
        if not text.startswith("]", pos) or _WHITESPACE.match(text, pos + 1).end() != len(text):
            json.loads(text)  # no ',' or ']' after an element, or more after the list: json says where, and raises
    except json.JSONDecodeError as e:
        hint = "; one JSON object per line? then name the file .jsonl" if e.msg == "Extra data" else ""
        raise LlavaMinError(f"{name}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}){hint}") from e


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _listing(title: str, lines: list[str]) -> str:
    more = f"\n  ... and {len(lines) - MAX_REPORTED} more" if len(lines) > MAX_REPORTED else ""
    return title + ":\n" + "\n".join("  " + line for line in lines[:MAX_REPORTED]) + more


def image_path(sample: dict, image_folder=None) -> str:
    return os.path.join(image_folder, sample["image"]) if image_folder else sample["image"]


# The rules: cheap type checks, every sample, all problems at once

class FileIndex(dict):
    """File existence by listing each folder once (folder -> its names): one listdir per folder instead of one
    stat per sample (mix665k has 665K samples in 6 image folders; stats on a network file system take minutes)."""

    def exists(self, path: str) -> bool:
        folder, name = os.path.split(path)
        if folder not in self:
            try:
                self[folder] = set(os.listdir(folder or "."))
            except OSError:
                self[folder] = set()
        return name in self[folder]


def sample_problems(sample: dict, image_folder=None, files: FileIndex | None = None) -> list[str]:
    """What is wrong with one sample, as short phrases; with `files`, a missing image file too. Conversations
    alternate from human to gpt (XTuner would silently drop a leading gpt or a trailing human message). A tag
    without an image, or an image without a tag, is an error rather than a guess: the first feeds the model a
    placeholder with no picture, the second a picture never referred to."""
    problems = []
    if not isinstance(sample.get("id"), str):
        problems.append(f"'id' is {_short(sample['id'])}, not a string or an integer" if "id" in sample else "no 'id'")
    conversations, image, tags = sample.get("conversations"), sample.get("image"), 0
    if conversations is None:
        problems.append("no 'conversations'")
    elif not isinstance(conversations, list):
        problems.append(f"'conversations' is a {type(conversations).__name__}, not a list")
    elif not conversations:
        problems.append("'conversations' is empty")
    else:
        well_formed, wrong_role = True, None
        for k, message in enumerate(conversations):  # the hot loop of start-up: plain type checks
            role, value = (message.get("from"), message.get("value")) if type(message) is dict else (None, None)
            if type(role) is not str or type(value) is not str:
                problems.append(_message_problem(k, message))
                well_formed = False
                continue
            if IMAGE_TAG in value:
                tags += value.count(IMAGE_TAG)
                if k:  # so that the image always precedes the first answer, and is never cut alone
                    problems.append(f"{IMAGE_TAG} in conversations[{k}] ({role}); it belongs in the first human turn")
            if role != ROLES[k % 2] and wrong_role is None:
                wrong_role = k
        if well_formed and wrong_role is not None:  # roles mean something once every message is well formed
            problems.append(f"conversations[{wrong_role}] is from {conversations[wrong_role]['from']!r} where "
                            f"{ROLES[wrong_role % 2]!r} was expected (turns alternate human, gpt, ...)")
        elif well_formed and len(conversations) % 2:
            problems.append("the last human turn has no gpt answer")
    if image is not None and not (isinstance(image, str) and image):
        problems.append(f"'image' is {_short(image)}, not a file name (one image per sample)")
    if tags > 1:
        problems.append(f"{tags} {IMAGE_TAG} tags; a sample holds one image, tagged once")
    elif tags == 1 and image is None:
        problems.append(f"{IMAGE_TAG} in the text but no 'image' field; add the image or remove the tag")
    elif tags == 0 and image is not None:
        problems.append(f"an 'image' field but no {IMAGE_TAG} tag; put '{IMAGE_TAG}\\n' at the start of the "
                        f"first human turn, or drop the 'image' field for a text-only sample")
    if files is not None and image is not None and not problems and not files.exists(image_path(sample, image_folder)):
        problems.append(f"image file {image_path(sample, image_folder)} does not exist"
                        f"{'' if image_folder else '; no --image-folder was given'}")
    return problems


def _message_problem(k: int, message) -> str:
    if not isinstance(message, dict):
        return f"conversations[{k}] is {_short(message)}, not {{\"from\": ..., \"value\": ...}}"
    wrong = [key for key in ("from", "value") if not isinstance(message.get(key), str)]
    return "; ".join(f"conversations[{k}][{key!r}] is {_short(message.get(key))}, not a string" for key in wrong)


def problem_report(samples: Samples, bad: dict[int, str], image_folder=None) -> str:
    lines = [f"{samples.describe(i, image_folder)}: {what}" for i, what in bad.items()]
    return _listing(f"{len(bad)} of {len(samples)} samples in {', '.join(name for name, _ in samples.sources)} are "
                    f"bad; fix or remove them (or drop them with skip_bad / --skip-bad-samples)", lines)


# The internlm2_chat template and XTuner's labels (xtuner/dataset/utils.py encode_fn, utils/templates.py)

def llava_turns(conversations: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs as XTuner's llava_map_fn builds them (xtuner/dataset/map_fns/dataset_map_fns/
    llava_map_fn.py): leading gpt messages and a trailing human one dropped, consecutive human messages joined."""
    messages = list(conversations)
    while messages and messages[0]["from"] == "gpt":
        messages.pop(0)
    turns, question = [], ""
    for message in messages:
        if message["from"] == "human":
            question += _tag_first(message["value"])
        elif message["from"] == "gpt":
            turns.append((question, message["value"]))
            question = ""
        else:
            raise LlavaMinError(f"a message from {message['from']!r}; LLaVA conversations use 'human' and 'gpt'")
    return turns


def _tag_first(value: str) -> str:
    return (IMAGE_TAG + "\n" + value.replace(IMAGE_TAG, "").strip()).strip() if IMAGE_TAG in value else value


def _encode_template(tok: Tokenizer, template: str, fields: dict, with_image: bool = False,
                     encode: Callable[[str], list[int]] | None = None) -> list[int]:
    """ids of template.format(**fields), chat-token names parsed in the template only: one typed in a message, or
    <s>, </s>, <unk>, stays text (here alone we differ from XTuner, whose tokenizer makes them control tokens). Each
    text piece between chat tokens, template words and message together, is one sentencepiece call: the strings
    XTuner's tokenizer.encode sees. with_image: "<image>" becomes IMAGE_TOKEN_INDEX (XTuner's encode_fn)."""
    encode = encode or (lambda text: tok.encode(text, special=False))
    ids = []
    for k, part in enumerate(CHAT_TOKEN_SPLIT.split(template)):
        if k % 2:  # odd pieces of re.split with a group: the chat-token names
            ids.append(tok.special_ids[part])
            continue
        chunks = part.format(**fields).split(IMAGE_TAG) if with_image else [part.format(**fields)]
        for j, chunk in enumerate(chunks):
            if j:
                ids.append(IMAGE_TOKEN_INDEX)
            ids += encode(chunk)
    return ids


def _prompt_template(system: str | None, first_turn: bool) -> str:
    # XTuner's template_map_fn puts SYSTEM before a turn's instruction when that turn has a system
    # text; the map functions that set one (openai_map_fn, ...) set it on the first turn only.
    if system and IMAGE_TAG in system:
        raise LlavaMinError(f"the system prompt contains {IMAGE_TAG!r}; images belong in a human turn")
    return (SYSTEM if system and first_turn else "") + INSTRUCTION


def llm_positions(ids: list[int], image_tokens: int) -> int:
    """LLM sequence length of `ids`: each image placeholder becomes image_tokens positions."""
    return len(ids) + ids.count(IMAGE_TOKEN_INDEX) * (image_tokens - 1)


def tokenize(tok: Tokenizer, conversations: list[dict], max_length: int, system: str | None = None,
             image_tokens: int = 1) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, ids before the cut) per XTuner's encode_fn, cut at max_length LLM positions."""
    ids, labels = [tok.bos_id], [IGNORE_INDEX]  # one BOS: SUFFIX_AS_EOS means no turn asks for another
    for k, (question, answer) in enumerate(llava_turns(conversations)):
        prompt = _encode_template(tok, _prompt_template(system, k == 0), {"system": system, "input": question},
                                  with_image=True)
        output = _encode_template(tok, "{output}" + SUFFIX, {"output": answer})
        sep = _encode_template(tok, SEP, {})
        ids += prompt + output + sep
        labels += [IGNORE_INDEX] * len(prompt) + output + [IGNORE_INDEX] * len(sep)
    full, used = len(ids), 0
    if llm_positions(ids, image_tokens) > max_length:
        for cut, token in enumerate(ids):  # an image that does not fit whole goes, with everything after it
            used += image_tokens if token == IMAGE_TOKEN_INDEX else 1
            if used > max_length:
                ids, labels = ids[:cut], labels[:cut]
                break
    return ids, labels, full


def encode_conversation(tok: Tokenizer, conversations: list[dict], max_length: int = 2048,
                        system: str | None = None, image_tokens: int = 1) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a LLaVA conversation, identical to XTuner's for the internlm2_chat template:

        [<s>]  <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n  ⟦{answer}<|im_end|>⟧  \\n

    per turn, <s> only at position 0, the system block `<|im_start|>system\\n{system}<|im_end|>\\n` before the
    first turn, only ⟦...⟧ supervised. One IMAGE_TOKEN_INDEX per image; cut to max_length LLM positions, an
    image counting image_tokens (1 = XTuner), possibly leaving no supervised label (LLaVADataset drops those)."""
    ids, labels, _ = tokenize(tok, conversations, max_length, system, image_tokens)
    return ids, labels


def first_answer_fits(counter: TokenCounter, conversations: list[dict], max_length: int, system: str | None = None,
                      image_tokens: int = 1) -> bool:
    """Whether encode_conversation(counter.tok, ...) of a valid sample keeps a supervised token: iff the first
    answer starts before max_length. Its start is bounded without tokenizing: every token covers at least one
    byte of text (byte fallback, no dummy prefix), a chat-token name (10+ bytes) is one token, and the 7-byte
    image tag becomes image_tokens positions. Only a prompt near the limit is tokenized: drops are exact."""
    template = _prompt_template(system, True)
    fields = {"system": system, "input": _tag_first(conversations[0]["value"])}  # valid: the first turn's question
    text = template.format(**fields)
    n_bytes = len(text) if text.isascii() else len(text.encode())
    if 1 + n_bytes + (image_tokens if IMAGE_TAG in text else 0) < max_length:
        return True
    # ids that count as positions (never IMAGE_TOKEN_INDEX): the length is all that matters here
    ids = _encode_template(counter.tok, template, fields, with_image=True, encode=lambda text: [0] * counter(text))
    return 1 + llm_positions(ids, image_tokens) < max_length


class TokenCounter:
    """len(tok.encode(text, special=False)), exactly, from a cache of counts per word: 5-10x faster on the long
    pasted documents that open some ShareGPT conversations (the doubtful few of first_answer_fits). Exact when no
    piece runs from a non-space character into a space (checked here; true of InternLM2's, else texts are encoded
    whole): no piece then crosses the point before such a space, so a text's count is the sum of its words'."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.cache = tok, {}
        crossing = re.compile(r"[^\s\u2581]\u2581")  # sentencepiece writes a space as U+2581
        self.by_word = not any(crossing.search(tok.sp.id_to_piece(i)) for i in range(tok.vocab_size)
                               if not tok.sp.is_byte(i))

    def __call__(self, text: str) -> int:
        if not self.by_word:
            return len(self.tok.encode(text, special=False))
        if len(self.cache) > 1 << 20:  # bounded memory on data with very many distinct words
            self.cache.clear()
        n = 0
        for word in _WORDS.split(text):
            count = self.cache.get(word)
            if count is None:
                count = self.cache[word] = len(self.tok.encode(word, special=False))
            n += count
        return n


def estimate_length(sample: dict, image_tokens: int) -> int:
    """Length for the length-grouped sampler, negative for text-only (XTuner's modality_length): 4 characters a
    token, 5 template tokens a message, image_tokens an image (only the order of the estimates matters)."""
    messages = sample["conversations"]
    text = sum(map(len, map(_VALUE, messages))) // 4 + 5 * len(messages) + 1
    return text + image_tokens if sample.get("image") is not None else -text


# Data set and collate

class LLaVADataset:
    """LLaVA samples (files, or a list of dicts) -> (input_ids, labels, pixel_values), tokenized and decoded per
    item, deterministically. Start-up reads the files once, checks each sample as it is parsed and drops those whose
    first answer starts beyond max_length (nothing to learn from); skip_bad drops (and counts) bad samples instead
    of raising an error that lists them; `report()` and `stats` say what was dropped. image_mode: "pad" (LLaVA-1.5)
    or "crop" (the tower's processor), with the tower's `preprocessing`; an image takes image_tokens positions;
    a longer sample is cut at the end (item["truncated"])."""

    def __init__(self, data, tokenizer, image_folder=None, *, image_size: int = 336, image_mode: str = "pad",
                 max_length: int = 2048, image_tokens: int = 1, system: str | None = None, skip_bad: bool = False,
                 preprocessing: Preprocessing = IMAGENET):
        if max_length <= 0 or image_tokens <= 0:
            raise LlavaMinError(f"max_length ({max_length}) and image_tokens ({image_tokens}) must be positive")
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        self.image_folder = os.fspath(image_folder) if image_folder is not None else None
        self.image_size, self.image_mode = image_size, image_mode
        self.preprocessing = preprocessing
        self.max_length, self.image_tokens, self.system = max_length, image_tokens, system

        samples, files, counter = Samples(data), FileIndex(), TokenCounter(self.tokenizer)
        kept, lengths, bad, unsupervised = [], array("q"), {}, {}
        for index, sample in enumerate(samples.scan()):
            problems = sample_problems(sample, self.image_folder, files)
            if problems:
                bad[index] = "; ".join(problems)
            elif not first_answer_fits(counter, sample["conversations"], max_length, system, image_tokens):
                unsupervised[index] = f"the first answer starts beyond max_length {max_length}"
            else:
                kept.append(index)
                lengths.append(estimate_length(sample, image_tokens))
        if not len(samples):
            raise LlavaMinError(f"no samples in {data!r}")
        if bad and not skip_bad:
            raise LlavaMinError(problem_report(samples, bad, self.image_folder))
        self._dropped = [f"{samples.describe(i, self.image_folder)}: {what}"
                         for i, what in {**bad, **unsupervised}.items()]
        if not kept:
            raise LlavaMinError(_listing(f"none of the {len(samples)} samples is usable; fix the data or raise "
                                         f"--max-length", self._dropped))
        self.samples = samples.keep(kept)
        self.lengths = lengths  # > 0 with an image, < 0 text-only: GlobalBatchSampler's input
        with_image = sum(1 for n in lengths if n > 0)
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

    def describe(self, i: int) -> str:
        """Sample i named for an error message (the loader calls this)."""
        return self.samples.describe(i, self.image_folder)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        ids, labels, full = tokenize(self.tokenizer, sample["conversations"], self.max_length, self.system,
                                     self.image_tokens)
        assert any(label != IGNORE_INDEX for label in labels), f"sample {i}: start-up should have dropped it"
        pixel_values, path = None, None
        if sample.get("image") is not None:
            path = image_path(sample, self.image_folder)
            try:
                # uint8: the model normalises on its device (a quarter of the bytes between processes)
                pixel_values = to_pixels(load_image(path), self.image_size, self.image_mode, self.preprocessing)
            except LlavaMinError as e:
                raise LlavaMinError(f"{self.describe(i)}: {e}") from e
        return {"index": i, "id": sample["id"], "input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "pixel_values": pixel_values, "image": path,
                "truncated": len(ids) < full}


def collate(samples: list[dict], pad_id: int = 0, shared: bool = False) -> dict:
    """Right-pad LLaVADataset items into a batch, one sample per row (XTuner's default_collate_fn); the mask comes
    from the lengths, as pad_id may be a real token (</s>). shared=True stacks the pixels straight into shared
    memory (a loader worker's reused slot), so that sending the batch copies nothing, as torch's default_collate."""
    return _collate_rows([[s] for s in samples], pad_id, shared)


def collate_packed(samples: list[dict], capacity: int, image_tokens: int, pad_id: int = 0,
                   shared: bool = False) -> dict:
    """Pack whole samples into rows of at most `capacity` LLM positions by their real lengths, first-fit, longest
    first; attention_mask k on a row's k-th sample keeps its attention and positions to itself (LLaVA.forward).
    The sampler planned rows from estimates: one too low makes a row more here, never a sample split or cut."""
    sizes = [llm_positions(s["input_ids"].tolist(), image_tokens) for s in samples]
    rows, room = [], []
    for i in sorted(range(len(samples)), key=lambda i: -sizes[i]):        # stable: ties keep the sampler's order
        if sizes[i] > capacity:
            raise LlavaMinError(f"sample {samples[i]['index']} (id {samples[i]['id']!r}) has {sizes[i]} LLM "
                                f"positions, more than a packed row of {capacity}: use --pack >= --max-length")
        row = next((r for r, free in enumerate(room) if free >= sizes[i]), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(capacity)
        rows[row].append(samples[i])
        room[row] -= sizes[i]
    return _collate_rows(rows, pad_id, shared)


def _collate_rows(rows: list[list[dict]], pad_id: int, shared: bool) -> dict:
    """The batch of `rows`, each a list of samples laid end to end; attention_mask = k on the row's k-th sample."""
    if not rows:
        raise LlavaMinError("collate got an empty batch")
    samples = [s for row in rows for s in row]
    lengths = [sum(len(s["input_ids"]) for s in row) for row in rows]
    input_ids = torch.full((len(rows), max(lengths)), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for r, row in enumerate(rows):
        at = 0
        for k, sample in enumerate(row, start=1):
            n = len(sample["input_ids"])
            input_ids[r, at:at + n] = sample["input_ids"]
            labels[r, at:at + n] = sample["labels"]
            attention_mask[r, at:at + n] = k
            at += n
    images = []
    for sample in samples:
        has, placeholders = sample["pixel_values"] is not None, int((sample["input_ids"] == IMAGE_TOKEN_INDEX).sum())
        if placeholders != int(has):
            raise LlavaMinError(f"sample {sample['index']} (id {sample['id']!r}): {placeholders} image "
                                f"placeholders but {int(has)} images")
        if has:
            images.append(sample["pixel_values"])
    if len({tuple(x.shape) for x in images}) > 1:
        shapes = {s["id"]: tuple(s["pixel_values"].shape) for s in samples if s["pixel_values"] is not None}
        raise LlavaMinError(f"images of one batch differ in shape: {shapes}; use one --image-size for all")
    pixel_values = None
    if images:
        out = shared_empty((len(images), *images[0].shape), images[0].dtype) if shared else None
        pixel_values = torch.stack(images, out=out)  # (n_images, 3, H, W), in row order
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": pixel_values, "image_counts": (input_ids == IMAGE_TOKEN_INDEX).sum(dim=1),
            "ids": [s["id"] for s in samples], "indices": [s["index"] for s in samples],
            "num_truncated": sum(bool(s.get("truncated")) for s in samples)}


if __name__ == "__main__":  # `python -m llava_min.data check|show ...`: the commands live in tools/datacheck.py
    from llava_min.tools.datacheck import main
    main()
