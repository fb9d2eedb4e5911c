"""(Plumbing) The one edit of a sentencepiece model file that tokenizer.py needs, on its protobuf bytes.

A learner can skip this file: `Tokenizer` calls `as_fast_tokenizer_reads_it` once, at load. The
serialized ModelProto is read field by field (a varint tag, then a varint, a length-delimited value
or a fixed-size number); no protobuf package is needed.
"""
from __future__ import annotations


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """The protobuf varint at buf[i]: (value, index after it)."""
    value = 0
    shift = 0
    while True:
        value |= (buf[i] & 0x7F) << shift
        shift += 7
        i += 1
        if buf[i - 1] < 0x80:
            return value, i


def _fields(buf: bytes, start: int, end: int):
    """(tag, value start, value end) for each field of the protobuf message in buf[start:end]."""
    i = start
    while i < end:
        tag, i = _varint(buf, i)
        wire = tag & 7
        if wire == 0:
            # A varint.
            j = _varint(buf, i)[1]
        elif wire == 2:
            # Length-delimited: a string, bytes or a sub-message.
            size, i = _varint(buf, i)
            j = i + size
        elif wire == 5:
            # fixed32 (a piece's float score).
            j = i + 4
        else:
            # fixed64.
            j = i + 8
        yield tag, i, j
        i = j


def as_fast_tokenizer_reads_it(proto: bytes) -> tuple[bytes, int | None]:
    """The serialized ModelProto with its user-defined pieces made normal, and the id of the piece
    "\\0". Sentencepiece matches user-defined pieces (the 147 `[UNUSED_TOKEN_n]`, "——", fullwidth
    letters) greedily before BPE; the fast tokenizer (tokenization_internlm2_fast.py) has them as
    plain vocabulary that only merges reach, as here. Raises IndexError on bytes that are no
    protobuf message."""
    buf = bytearray(proto)
    nul = None
    # ModelProto field 1: the repeated SentencePiece messages.
    pieces = (f for f in _fields(buf, 0, len(buf)) if f[0] == 0x0A)
    for index, (_, start, end) in enumerate(pieces):
        for tag, i, j in _fields(buf, start, end):
            if tag == 0x0A and buf[i:j] == b"\0":
                # Field 1, the piece's text.
                nul = index
            elif tag == 0x18 and buf[i] == 4:
                # Field 3, the type: USER_DEFINED (4) -> NORMAL (1), one byte each.
                buf[i] = 1
    return bytes(buf), nul
