"""LLaVA samples kept as their files' bytes plus four numbers per sample, parsed again when read.

Plumbing under data.py: a learner can take `Samples` as "a list of sample dicts that forks
cheaply". 665K dicts would be ~2.5 GB of small objects that copy-on-write slowly copies into every
forked loader worker as it touches their reference counts (pytorch/pytorch#13246); a few bytes
objects and one array are shared as they are, and pickle whole. The JSON-list scanner runs json's
own decoder element by element (json.load's speed).
"""
from __future__ import annotations

import json
import os
import re
from array import array
from pathlib import Path
from typing import Iterator

import numpy as np

from . import LlavaMinError

MAX_REPORTED = 20      # problems listed in full; the rest are counted

_WHITESPACE = re.compile(r"[ \t\n\r]*")  # what JSON allows between values


class Samples:
    """The samples of JSON-list and JSONL files (or of a list of dicts): the files' bytes, and per
    sample its file, item or line number, start and end byte."""

    def __init__(self, data):
        if isinstance(data, (list, tuple)) and data and all(isinstance(s, dict) for s in data):
            # In memory: one JSONL document, so that it takes the same path as a file.
            lines = [json.dumps(s, ensure_ascii=False) for s in data]
            self.sources = [("given in memory", "\n".join(lines))]
        else:
            if isinstance(data, (str, os.PathLike)):
                data = [data]
            self.sources = [(os.fspath(f), None) for f in data]
        self.buffers: list[bytes] = []
        self.labels: list[str] = []    # per file: "x.json item {}", "x.jsonl line {}", "given in memory"
        self.spans = array("q")        # per sample: file, number, start, end (byte offsets in its buffer)

    def scan(self) -> Iterator[dict]:
        """Each sample as it is parsed (checked by the caller in the same pass), its id made a
        string as XTuner does. Unreadable files raise at once; invalid JSON lines and non-objects
        after the last sample, all listed."""
        errors = []
        for name, text in self.sources:
            for number, start, end, entry in self._entries(name, text, errors):
                if not isinstance(entry, dict):
                    label = self.labels[-1].format(number)
                    errors.append(f"{label}: a sample must be a JSON object, found {short(entry)}")
                    continue
                self.spans.extend((len(self.buffers) - 1, number, start, end))
                yield _string_id(entry)
        if errors:
            names = ", ".join(name for name, _ in self.sources)
            raise LlavaMinError(listing(f"{len(errors)} unreadable entries in {names}", errors))

    def _entries(self, name: str, text: str | None, errors: list):
        """Read one source, keep its bytes and label, and yield (number, start, end, entry) per element.
        """
        in_memory = text is not None
        jsonl = in_memory or name.endswith(".jsonl")
        try:
            if in_memory:
                raw = text.encode()
            else:
                raw = Path(name).read_bytes()
            if not jsonl:
                text = raw.decode("utf-8")  # the json module parses str only
        except (OSError, UnicodeDecodeError) as e:
            raise LlavaMinError(f"cannot read data file {name}: {e}") from e
        self.buffers.append(raw)
        # The label is a format string with the item or line number as its one field.
        escaped = name.replace("{", "{{").replace("}", "}}")
        if in_memory:
            self.labels.append(name)
        elif jsonl:
            self.labels.append(f"{escaped} line {{}}")
        else:
            self.labels.append(f"{escaped} item {{}}")
        if jsonl:
            return _jsonl_entries(raw, errors, self.labels[-1])
        return _json_list_entries(text, name)

    def keep(self, indices) -> Samples:
        """The samples at `indices` (sharing the bytes)."""
        kept = Samples([])
        kept.sources = self.sources
        kept.buffers = self.buffers
        kept.labels = self.labels
        spans = np.frombuffer(self.spans, np.int64).reshape(-1, 4)    # (samples, 4)
        kept.spans = array("q", spans[indices].tobytes())
        return kept

    def __len__(self) -> int:
        return len(self.spans) // 4

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        file, _, start, end = self.spans[4 * i:4 * i + 4]
        return _string_id(json.loads(self.buffers[file][start:end]))

    def where(self, i: int) -> str:
        """'data/x.json item 12': the file and the item or line number of sample i."""
        file, number = self.spans[4 * i:4 * i + 2]
        return self.labels[file].format(number)

    def names(self) -> str:
        return ", ".join(name for name, _ in self.sources)


def _string_id(sample: dict) -> dict:
    """An integer id as a string (XTuner's); not a bool, though bool is an int subclass."""
    if type(sample.get("id")) is int:
        return {**sample, "id": str(sample["id"])}
    return sample


def _jsonl_entries(raw: bytes, errors: list, label: str):
    """(line number, start, end, entry) per non-blank line; invalid lines go to `errors`."""
    start = 0
    number = 0
    while start < len(raw):
        end = raw.find(b"\n", start)
        if end < 0:
            end = len(raw)
        number += 1
        if raw[start:end].strip():
            try:
                yield number, start, end, json.loads(raw[start:end])
            except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
                where = f"{getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')}"
                errors.append(f"{label.format(number)}: not valid JSON ({where})")
        start = end + 1


def _json_list_entries(text: str, name: str):
    """(item number, start byte, end byte, entry) per element of a JSON list, by json's scanner."""
    decode = json.JSONDecoder().raw_decode
    pos = _WHITESPACE.match(text).end()
    try:
        if not text.startswith("[", pos):
            data = json.loads(text)  # not a list: let json say why, or name what it is
            raise LlavaMinError(f"{name}: a JSON list of samples expected, found a {type(data).__name__}")
        offsets = _ByteOffsets(text)
        pos = _WHITESPACE.match(text, pos + 1).end()
        number = 0
        more = not text.startswith("]", pos)
        while more:
            entry, end = decode(text, pos)
            yield number, *offsets.span(pos, end), entry
            number += 1
            pos = _WHITESPACE.match(text, end).end()
            more = text.startswith(",", pos)
            if more:
                pos = _WHITESPACE.match(text, pos + 1).end()
        after_list = _WHITESPACE.match(text, pos + 1).end()
        if not text.startswith("]", pos) or after_list != len(text):
            json.loads(text)  # no ',' or ']' after an element, or more after the list: json says where, and raises
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg == "Extra data":
            hint = "; one JSON object per line? then name the file .jsonl"
        where = f"{e.msg} at line {e.lineno} column {e.colno}"
        raise LlavaMinError(f"{name}: not valid JSON ({where}){hint}") from e


class _ByteOffsets:
    """Byte offsets of character spans met in increasing order: equal in ASCII text (str.isascii is
    O(1)), else counted from the last span's end."""

    def __init__(self, text: str):
        self.text = text
        self.ascii = text.isascii()
        self.last_char = 0
        self.last_byte = 0

    def span(self, start: int, end: int) -> tuple[int, int]:
        if self.ascii:
            return start, end
        first = self.last_byte + len(self.text[self.last_char:start].encode())
        self.last_byte = first + len(self.text[start:end].encode())
        self.last_char = end
        return first, self.last_byte


def short(value, limit: int = 60) -> str:
    """A value quoted for an error message, cut at `limit` characters."""
    if isinstance(value, str):
        text = repr(value)
    else:
        text = json.dumps(value, ensure_ascii=False)
    if len(text) <= limit:
        return text
    return text[:limit] + "..."


def listing(title: str, lines: list[str]) -> str:
    """'title:' and the first MAX_REPORTED lines, indented, then how many more."""
    shown = "\n".join("  " + line for line in lines[:MAX_REPORTED])
    more = ""
    if len(lines) > MAX_REPORTED:
        more = f"\n  ... and {len(lines) - MAX_REPORTED} more"
    return title + ":\n" + shown + more
