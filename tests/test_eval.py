"""Exact-match scoring as CONTRACT defines it: lower-cased, surrounding punctuation and white space stripped
(inner punctuation kept); a malformed test file is refused naming the item."""
import json

import pytest

from llava_min import LlavaMinError
from llava_min.eval import load_test_set, normalise


@pytest.mark.parametrize("raw,want", [("Red", "red"), ("  red.\n", "red"), ('"Top-left!"', "top-left"),
                                      ("two shapes.", "two shapes"), ("", "")])
def test_normalise(raw, want):
    assert normalise(raw) == want


def test_inner_punctuation_still_counts():
    assert normalise("top-left") != normalise("top left")


def test_bad_test_file_names_the_item(tmp_path):
    f = tmp_path / "test.json"
    f.write_text(json.dumps([{"id": "a", "question": "q", "answer": "x"}, {"id": "b", "question": "q"}]))
    with pytest.raises(LlavaMinError, match=r"item 1 \(id 'b'\) lacks \['answer'\]"):
        load_test_set(f)
