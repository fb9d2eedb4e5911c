"""LLaVA-format samples -> XTuner's internlm2_chat ids and labels; the data set, its start-up
checks, collate.

Read `encode_conversation` (the template, exactly XTuner's), `LLaVADataset` (what start-up checks and drops,
cheaply enough for 665K samples; the rules: `sample_problems`), then `collate`. A sample, in a JSON list or JSONL:
    {"id": "000000033471" or 33471, "image": "coco/train2017/000000033471.jpg",      (optional)
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A cat."}, ...]}
Several images (LLaVA-NeXT-Interleave, LLaVA-OneVision): "image" is a list of file names and the human turns hold
one <image> tag per image, in the same order (the first tag is the first image):
    {"id": "pair-7", "image": ["a.png", "b.png"],
     "conversations": [{"from": "human", "value": "<image> and <image>: which has more shapes?"}, ...]}
"""
from __future__ import annotations

import os
import re
from array import array
from operator import itemgetter
from typing import Callable

import torch

from . import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaMinError
from .image import IMAGENET, Preprocessing, load_image, to_pixels
from .jsonscan import Samples, listing, short
from .shm import shared_empty
from .tokenizer import CHAT_TOKEN_SPLIT, Tokenizer

__all__ = ["Samples", "LLaVADataset", "collate", "collate_packed", "encode_conversation", "sample_problems"]

# XTuner PROMPT_TEMPLATE.internlm2_chat (xtuner/utils/templates.py), exact strings.
SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
SUFFIX = "<|im_end|>"  # SUFFIX_AS_EOS: the answer ends with <|im_end|>, supervised, and no </s>
SEP = "\n"             # after each answer, not supervised
IMAGE_TAG = "<image>"
ROLES = ("human", "gpt")
# Start-up counts the samples that max_length cuts exactly up to this many doubtful ones; beyond,
# on as many spread evenly over them, and scales the count up (each costs a tokenization: 665K
# would take minutes).
TRUNCATION_SAMPLE = 5_000

_VALUE = itemgetter("value")
# Before each space that follows a non-space: see TokenCounter
_WORDS = re.compile(r"(?<=[^\s\u2581])(?= )")

# The kinds of bad sample, as the start-up report counts them.
MALFORMED = "malformed"
TAG_COUNT = "tag/image count mismatch"
GPT_TAG = "tag in a gpt turn"
MISSING_FILE = "missing image file"
EMPTY_LIST = "empty image list"
IMAGE_FIELD = "'image' not a file name"
# What LLaVADataset does with an image that does not decode as an item is built (its docstring).
DECODE_ERRORS = ("raise", "mark")


def image_files(sample: dict) -> list[str]:
    """The sample's image file names, in order: [] without an "image" field, one for a string, else
    the list."""
    image = sample.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    return list(image)


def image_paths(sample: dict, image_folder=None) -> list[str]:
    """image_files, joined to image_folder."""
    if not image_folder:
        return image_files(sample)
    return [os.path.join(image_folder, name) for name in image_files(sample)]


def describe(samples: Samples, i: int, image_folder=None) -> str:
    """'sample 12 (id '33471', data/x.json item 12, image /img/coco/1.jpg)' for error messages."""
    sample = samples[i]
    fields = [f"id {sample.get('id')!r}", samples.where(i)]
    if not image_problem(sample.get("image")):
        paths = image_paths(sample, image_folder)
        if len(paths) == 1:
            fields.append(f"image {paths[0]}")
        elif paths:
            fields.append(f"images {', '.join(paths)}")
    return f"sample {i} ({', '.join(fields)})"


# The rules: cheap type checks, every sample, all problems at once

class FileIndex(dict):
    """File existence by listing each folder once (folder -> its names): one listdir per folder
    instead of one stat per sample (mix665k has 665K samples in 6 image folders; stats on a network
    file system take minutes)."""

    def exists(self, path: str) -> bool:
        folder, name = os.path.split(path)
        if folder not in self:
            try:
                self[folder] = set(os.listdir(folder or "."))
            except OSError:
                self[folder] = set()
        return name in self[folder]


def image_problem(image) -> tuple[str, str] | None:
    """(kind, phrase) when the "image" field is neither absent, a file name, nor a non-empty list of them.
    """
    if image is None or (type(image) is str and image):
        return None
    if isinstance(image, list):
        if not image:
            return EMPTY_LIST, "'image' is an empty list; name the images, or drop the field for a text-only sample"
        if all(type(name) is str and name for name in image):
            return None
    return IMAGE_FIELD, f"'image' is {short(image)}, not a file name or a list of file names"


def sample_problems(sample: dict, image_folder=None, files: FileIndex | None = None) -> list[str]:
    """What is wrong with one sample, as short phrases; with `files`, a missing image file too."""
    return [phrase for _, phrase in classified_problems(sample, image_folder, files)]


def classified_problems(sample: dict, image_folder=None, files: FileIndex | None = None) -> list[tuple[str, str]]:
    """(kind, phrase) per problem of one sample. Conversations alternate from human to gpt (XTuner
    would silently drop a leading gpt or a trailing human message). The <image> tags of the human
    turns match the images in number, in order; a tag without an image, or an image without a tag,
    is an error rather than a guess: the first feeds the model a placeholder with no picture, the
    second a picture never referred to."""
    problems = []
    if not isinstance(sample.get("id"), str):
        if "id" in sample:
            problems.append((MALFORMED, f"'id' is {short(sample['id'])}, not a string or an integer"))
        else:
            problems.append((MALFORMED, "no 'id'"))
    tags = _conversation_problems(sample.get("conversations"), problems)
    image = sample.get("image")
    bad_image = image_problem(image)
    if bad_image:
        problems.append(bad_image)
        return problems
    names = image_files(sample)
    if tags is not None and tags != len(names):
        problems.append((TAG_COUNT, _count_phrase(tags, len(names))))
    if files is None or problems:
        return problems
    missing = [path for path in image_paths(sample, image_folder) if not files.exists(path)]
    if missing:
        phrase = f"image file {missing[0]} does not exist"
        if len(missing) > 1:
            phrase += f" (and {len(missing) - 1} more of its {len(names)} images)"
        if not image_folder:
            phrase += "; no --image-folder was given"
        problems.append((MISSING_FILE, phrase))
    return problems


def _conversation_problems(conversations, problems: list) -> int | None:
    """Append the problems of "conversations"; return the <image> tags of its human turns (None if
    malformed)."""
    if conversations is None:
        problems.append((MALFORMED, "no 'conversations'"))
        return None
    if not isinstance(conversations, list):
        problems.append((MALFORMED, f"'conversations' is a {type(conversations).__name__}, not a list"))
        return None
    if not conversations:
        problems.append((MALFORMED, "'conversations' is empty"))
        return None
    tags = 0
    well_formed = True
    wrong_role = None
    # The hot loop of start-up: plain type checks.
    for k, message in enumerate(conversations):
        role = None
        value = None
        if type(message) is dict:
            role = message.get("from")
            value = message.get("value")
        if type(role) is not str or type(value) is not str:
            problems.append((MALFORMED, _message_problem(k, message)))
            well_formed = False
            continue
        if IMAGE_TAG in value:
            if role == "gpt":
                problems.append((GPT_TAG, f"{IMAGE_TAG} in conversations[{k}] (gpt); images belong in human turns"))
            else:
                tags += value.count(IMAGE_TAG)
        if role != ROLES[k % 2] and wrong_role is None:
            wrong_role = k
    if not well_formed:
        return None
    # Roles mean something once every message is well formed.
    if wrong_role is not None:
        found = conversations[wrong_role]["from"]
        problems.append((MALFORMED, f"conversations[{wrong_role}] is from {found!r} where "
                                    f"{ROLES[wrong_role % 2]!r} was expected (turns alternate human, gpt, ...)"))
    elif len(conversations) % 2:
        problems.append((MALFORMED, "the last human turn has no gpt answer"))
    return tags


def _count_phrase(tags: int, images: int) -> str:
    if images == 0:
        return f"{IMAGE_TAG} in the text but no 'image' field; add the image or remove the tag"
    if tags == 0:
        return (f"an 'image' field but no {IMAGE_TAG} tag; put '{IMAGE_TAG}\\n' at the start of the first human "
                f"turn, or drop the 'image' field for a text-only sample")
    counted = f"{tags} {IMAGE_TAG} tags"
    if tags == 1:
        counted = f"1 {IMAGE_TAG} tag"
    return f"{counted} but {images} images in 'image'; one tag per image, in the same order"


def _message_problem(k: int, message) -> str:
    if not isinstance(message, dict):
        return f"conversations[{k}] is {short(message)}, not {{\"from\": ..., \"value\": ...}}"
    wrong = [key for key in ("from", "value") if not isinstance(message.get(key), str)]
    phrases = [f"conversations[{k}][{key!r}] is {short(message.get(key))}, not a string" for key in wrong]
    return "; ".join(phrases)


def problem_report(samples: Samples, bad: dict[int, str], image_folder=None) -> str:
    lines = [f"{describe(samples, i, image_folder)}: {what}" for i, what in bad.items()]
    return listing(f"{len(bad)} of {len(samples)} samples in {samples.names()} are bad; fix or remove them "
                   f"(or drop them with skip_bad / --skip-bad-samples)", lines)


# The internlm2_chat template and XTuner's labels (xtuner/dataset/utils.py encode_fn,
# utils/templates.py)

def llava_turns(conversations: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs as XTuner's llava_map_fn builds them
    (xtuner/dataset/map_fns/dataset_map_fns/ llava_map_fn.py): leading gpt messages and a trailing
    human one dropped, consecutive human messages joined."""
    messages = list(conversations)
    while messages and messages[0]["from"] == "gpt":
        messages.pop(0)
    turns = []
    question = ""
    for message in messages:
        if message["from"] == "human":
            question += place_tags(message["value"])
        elif message["from"] == "gpt":
            turns.append((question, message["value"]))
            question = ""
        else:
            raise LlavaMinError(f"a message from {message['from']!r}; LLaVA conversations use 'human' and 'gpt'")
    return turns


def place_tags(value: str) -> str:
    """A message with one <image> tag gets it in front, on its own line (XTuner's llava_map_fn,
    LLaVA-NeXT's preprocess_multimodal); the tags of a message with several stay where they are:
    their places interleave the images with the text."""
    if value.count(IMAGE_TAG) != 1:
        return value
    return (IMAGE_TAG + "\n" + value.replace(IMAGE_TAG, "").strip()).strip()


def _encode_template(tok: Tokenizer, template: str, fields: dict, with_image: bool = False,
                     encode: Callable[[str], list[int]] | None = None) -> list[int]:
    """ids of template.format(**fields), chat-token names parsed in the template only: one typed in
    a message, or <s>, </s>, <unk>, stays text (here alone we differ from XTuner, whose tokenizer
    makes them control tokens). Each text piece between chat tokens, template words and message
    together, is one sentencepiece call: the strings XTuner's tokenizer.encode sees. with_image:
    "<image>" becomes IMAGE_TOKEN_INDEX (XTuner's encode_fn)."""
    if encode is None:
        encode = lambda text: tok.encode(text, special=False)  # noqa: E731
    ids = []
    for k, part in enumerate(CHAT_TOKEN_SPLIT.split(template)):
        # Odd pieces of re.split with a group are the chat-token names.
        if k % 2:
            ids.append(tok.special_ids[part])
            continue
        text = part.format(**fields)
        chunks = [text]
        if with_image:
            chunks = text.split(IMAGE_TAG)
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
    if system and first_turn:
        return SYSTEM + INSTRUCTION
    return INSTRUCTION


def llm_positions(ids: list[int], image_tokens: int) -> int:
    """LLM sequence length of `ids`: each image placeholder becomes image_tokens positions."""
    return len(ids) + ids.count(IMAGE_TOKEN_INDEX) * (image_tokens - 1)


def _assemble(tok: Tokenizer, conversations: list[dict], system: str | None,
              encode: Callable[[str], list[int]] | None = None) -> tuple[list[int], list[int]]:
    """The whole conversation's (ids, labels) per XTuner's encode_fn, before any cut."""
    # One BOS: SUFFIX_AS_EOS means no turn asks for another.
    ids = [tok.bos_id]
    labels = [IGNORE_INDEX]
    for k, (question, answer) in enumerate(llava_turns(conversations)):
        fields = {"system": system, "input": question}
        prompt = _encode_template(tok, _prompt_template(system, k == 0), fields, with_image=True, encode=encode)
        output = _encode_template(tok, "{output}" + SUFFIX, {"output": answer}, encode=encode)
        sep = _encode_template(tok, SEP, {}, encode=encode)
        ids += prompt + output + sep
        labels += [IGNORE_INDEX] * len(prompt) + output + [IGNORE_INDEX] * len(sep)
    return ids, labels


def _cut(ids: list[int], max_length: int, image_tokens: int) -> int:
    """How many ids fit in max_length LLM positions. A cut never falls inside an image's positions:
    an image that does not fit whole goes, with everything after it (with image_tokens 1, XTuner's
    plain cut of the ids)."""
    if llm_positions(ids, image_tokens) <= max_length:
        return len(ids)
    used = 0
    for cut, token in enumerate(ids):
        if token == IMAGE_TOKEN_INDEX:
            used += image_tokens
        else:
            used += 1
        if used > max_length:
            return cut
    return len(ids)


def tokenize(tok: Tokenizer, conversations: list[dict], max_length: int, system: str | None = None,
             image_tokens: int = 1) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, ids before the cut) per XTuner's encode_fn, cut at max_length LLM positions.
    """
    ids, labels = _assemble(tok, conversations, system)
    keep = _cut(ids, max_length, image_tokens)
    return ids[:keep], labels[:keep], len(ids)


def encode_conversation(tok: Tokenizer, conversations: list[dict], max_length: int = 2048,
                        system: str | None = None, image_tokens: int = 1) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a LLaVA conversation, identical to XTuner's for the internlm2_chat template:

        [<s>]  <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n  ⟦{answer}<|im_end|>⟧  \\n

    per turn, <s> only at position 0, the system block `<|im_start|>system\\n{system}<|im_end|>\\n`
    before the first turn, only ⟦...⟧ supervised. One IMAGE_TOKEN_INDEX per image tag; cut to
    max_length LLM positions, an image counting image_tokens (1 = XTuner), possibly leaving no
    supervised label (LLaVADataset drops those)."""
    ids, labels, _ = tokenize(tok, conversations, max_length, system, image_tokens)
    return ids, labels


def first_answer_fits(counter: TokenCounter, conversations: list[dict], max_length: int, system: str | None = None,
                      image_tokens: int = 1) -> bool:
    """Whether encode_conversation(counter.tok, ...) of a valid sample keeps a supervised token:
    iff the first answer starts before max_length. Its start is bounded without tokenizing: every
    token covers at least one byte of text (byte fallback, no dummy prefix), a chat-token name (10+
    bytes) is one token, and each 7-byte image tag becomes image_tokens positions. Only a prompt
    near the limit is tokenized: drops are exact."""
    template = _prompt_template(system, True)
    # Valid: the first message is the first turn's question.
    fields = {"system": system, "input": place_tags(conversations[0]["value"])}
    text = template.format(**fields)
    if 1 + _bytes(text) + text.count(IMAGE_TAG) * image_tokens < max_length:
        return True
    # The ids only count positions here (never IMAGE_TOKEN_INDEX): the length is all that matters.
    ids = _encode_template(counter.tok, template, fields, with_image=True, encode=counter.zeros)
    return 1 + llm_positions(ids, image_tokens) < max_length


def _bytes(text: str) -> int:
    if text.isascii():
        return len(text)
    return len(text.encode())


def may_be_cut(conversations: list[dict], max_length: int, system: str | None, images: int,
               image_tokens: int) -> bool:
    """False when the whole conversation surely fits in max_length (the bound of first_answer_fits,
    every turn's template included); True when it has to be tokenized to know."""
    template = len(INSTRUCTION) + len(SUFFIX) + len(SEP)
    text = sum(_bytes(value) for value in map(_VALUE, conversations))
    if system:
        text += len(SYSTEM) + _bytes(system)
    return 1 + text + template * len(conversations) + images * image_tokens > max_length


def cut_images(counter: TokenCounter, conversations: list[dict], max_length: int, system: str | None,
               image_tokens: int) -> tuple[bool, int]:
    """(whether max_length cuts the sample, how many of its images the cut leaves out), by counting
    tokens."""
    ids, labels = _assemble(counter.tok, conversations, system, encode=counter.zeros)
    keep = _cut(ids, max_length, image_tokens)
    left_out = ids[keep:].count(IMAGE_TOKEN_INDEX)
    return keep < len(ids), left_out


class TokenCounter:
    """len(tok.encode(text, special=False)), exactly, from a cache of counts per word: 5-10x faster
    on the long pasted documents that open some ShareGPT conversations (the doubtful few of
    first_answer_fits). Exact when no piece runs from a non-space character into a space (checked
    here; true of InternLM2's, else texts are encoded whole): no piece then crosses the point
    before such a space, so a text's count is the sum of its words'."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.cache = {}
        crossing = re.compile(r"[^\s\u2581]\u2581")  # sentencepiece writes a space as U+2581
        pieces = (tok.sp.id_to_piece(i) for i in range(tok.vocab_size) if not tok.sp.is_byte(i))
        self.by_word = not any(crossing.search(piece) for piece in pieces)

    def __call__(self, text: str) -> int:
        if not self.by_word:
            return len(self.tok.encode(text, special=False))
        # Bounded memory on data with very many distinct words.
        if len(self.cache) > 1 << 20:
            self.cache.clear()
        n = 0
        for word in _WORDS.split(text):
            count = self.cache.get(word)
            if count is None:
                count = len(self.tok.encode(word, special=False))
                self.cache[word] = count
            n += count
        return n

    def zeros(self, text: str) -> list[int]:
        """As many ids as `text` encodes to, all 0: for counting positions."""
        return [0] * self(text)


def estimate_length(sample: dict, image_tokens: int) -> int:
    """Length for the length-grouped sampler, negative for text-only (XTuner's modality_length): 4
    characters a token, 5 template tokens a message, image_tokens each image (only the order of the
    estimates matters)."""
    messages = sample["conversations"]
    text = sum(map(len, map(_VALUE, messages))) // 4 + 5 * len(messages) + 1
    images = len(image_files(sample))
    if images:
        return text + images * image_tokens
    return -text


# Data set and collate

class LLaVADataset:
    """LLaVA samples (files, or a list of dicts) -> (input_ids, labels, pixel_values), tokenized
    and decoded per item, deterministically. Start-up reads the files once, checks each sample as
    it is parsed and drops those whose first answer starts beyond max_length (nothing to learn
    from) or, with max_images, that hold more images; skip_bad drops (and counts, per kind) bad
    samples instead of raising an error that lists them; `report()` and `stats` say what was
    dropped and how many samples max_length cuts. image_mode: "pad" (LLaVA-1.5) or "crop" (the
    tower's processor), with the tower's `preprocessing`; each image takes image_tokens positions;
    a longer sample is cut at the end (item["truncated"]).
    An image that exists but does not decode is met only here, mid-run: decode_errors "raise"
    (the default) raises an error naming the sample; "mark" (train.py) hands the sample on,
    dropped from the loss (`bad_item`), so that the training loop decides, on every rank at once,
    to skip it or to stop.
    """

    def __init__(self, data, tokenizer, image_folder=None, *, image_size: int = 336, image_mode: str = "pad",
                 max_length: int = 2048, image_tokens: int = 1, system: str | None = None, skip_bad: bool = False,
                 max_images: int | None = None, preprocessing: Preprocessing = IMAGENET,
                 decode_errors: str = "raise"):
        if decode_errors not in DECODE_ERRORS:
            raise LlavaMinError(f"decode_errors is {decode_errors!r}; use one of "
                                f"{', '.join(DECODE_ERRORS)}")
        if max_length <= 0 or image_tokens <= 0:
            raise LlavaMinError(f"max_length ({max_length}) and image_tokens ({image_tokens}) must be positive")
        if max_images is not None and max_images < 0:
            raise LlavaMinError(f"max_images ({max_images}) must be 0 or more (None: no limit)")
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        self.image_folder = None
        if image_folder is not None:
            self.image_folder = os.fspath(image_folder)
        self.image_size = image_size
        self.image_mode = image_mode
        self.preprocessing = preprocessing
        self.max_length = max_length
        self.image_tokens = image_tokens
        self.system = system
        self.max_images = max_images
        self.decode_errors = decode_errors
        samples = Samples(data)
        self._start_up(samples, skip_bad)
        self.samples = samples.keep(self._kept)
        del self._kept

    def _start_up(self, samples: Samples, skip_bad: bool) -> None:
        """One pass over the files: check, drop and count; sets lengths, stats and the dropped samples' lines.
        """
        files = FileIndex()
        counter = TokenCounter(self.tokenizer)
        self._kept = []
        self.lengths = array("q")  # > 0 with an image, < 0 text-only: GlobalBatchSampler's input
        bad = {}
        unsupervised = {}
        too_many = {}
        kinds: dict[str, int] = {}
        doubtful = []              # (kept position, sample) that max_length may cut
        several = 0
        most_images = 0
        for index, sample in enumerate(samples.scan()):
            problems = classified_problems(sample, self.image_folder, files)
            if problems:
                bad[index] = "; ".join(phrase for _, phrase in problems)
                for kind in {kind for kind, _ in problems}:
                    kinds[kind] = kinds.get(kind, 0) + 1
                continue
            conversations = sample["conversations"]
            images = len(image_files(sample))
            if self.max_images is not None and images > self.max_images:
                too_many[index] = f"{images} images, more than max_images {self.max_images}"
            elif not first_answer_fits(counter, conversations, self.max_length, self.system, self.image_tokens):
                unsupervised[index] = f"the first answer starts beyond max_length {self.max_length}"
            else:
                if may_be_cut(conversations, self.max_length, self.system, images, self.image_tokens):
                    doubtful.append(len(self._kept))
                self._kept.append(index)
                self.lengths.append(estimate_length(sample, self.image_tokens))
                several += images > 1
                most_images = max(most_images, images)
        if not len(samples):
            raise LlavaMinError(f"no samples in {samples.names()}")
        if bad and not skip_bad:
            raise LlavaMinError(problem_report(samples, bad, self.image_folder))
        dropped = {**bad, **too_many, **unsupervised}
        self._dropped = [f"{describe(samples, i, self.image_folder)}: {what}" for i, what in sorted(dropped.items())]
        if not self._kept:
            raise LlavaMinError(listing(f"none of the {len(samples)} samples is usable; fix the data or raise "
                                        f"--max-length", self._dropped))
        truncated, left_out = self._count_cuts(samples, doubtful, counter)
        with_image = sum(1 for n in self.lengths if n > 0)
        self.stats = {"loaded": len(samples), "used": len(self._kept), "with_image": with_image,
                      "several_images": several, "most_images": most_images,
                      "text_only": len(self._kept) - with_image,
                      "truncated": truncated, "images_left_out": left_out, "truncation_exact": True,
                      "dropped_bad": len(bad), "bad_kinds": dict(sorted(kinds.items())),
                      "dropped_no_supervision": len(unsupervised), "dropped_too_many_images": len(too_many)}
        if len(doubtful) > TRUNCATION_SAMPLE:
            self.stats["truncation_exact"] = False

    def _count_cuts(self, samples: Samples, doubtful: list[int], counter: TokenCounter) -> tuple[int, int]:
        """(samples max_length cuts, images it leaves out) among the kept ones; scaled from
        TRUNCATION_SAMPLE of the doubtful ones when there are more."""
        chosen = doubtful
        if len(doubtful) > TRUNCATION_SAMPLE:
            step = len(doubtful) / TRUNCATION_SAMPLE
            chosen = [doubtful[int(k * step)] for k in range(TRUNCATION_SAMPLE)]
        truncated = 0
        left_out = 0
        for kept in chosen:
            conversations = samples[self._kept[kept]]["conversations"]
            cut, images = cut_images(counter, conversations, self.max_length, self.system, self.image_tokens)
            truncated += cut
            left_out += images
        scale = len(doubtful) / max(len(chosen), 1)
        return round(truncated * scale), round(left_out * scale)

    def report(self) -> str:
        """The start-up report: what is used, what is cut, what was dropped and why (the first 20 named).
        """
        s = self.stats
        several = ""
        if s["several_images"]:
            several = f", {s['several_images']} of them with several"
        about = "" if s["truncation_exact"] else "about "
        left_out = ""
        if s["images_left_out"]:
            left_out = f", {about}{s['images_left_out']} images left out"
        kinds = ""
        if s["bad_kinds"]:
            kinds = " (" + ", ".join(f"{n} {kind}" for kind, n in s["bad_kinds"].items()) + ")"
        too_many = ""
        if self.max_images is not None:
            too_many = f", {s['dropped_too_many_images']} with more than {self.max_images} images"
        text = (f"data: {s['used']} of {s['loaded']} samples used ({s['with_image']} with an image{several}, "
                f"{s['text_only']} text-only); {about}{s['truncated']} cut at max_length {self.max_length}{left_out}; "
                f"dropped {s['dropped_bad']} bad{kinds}, {s['dropped_no_supervision']} with no supervised token "
                f"within max_length {self.max_length}{too_many} (image = {self.image_tokens} positions)")
        if self._dropped:
            return listing(text, self._dropped)
        return text

    def describe(self, i: int) -> str:
        """Sample i named for an error message (the loader calls this)."""
        return describe(self.samples, i, self.image_folder)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        conversations = sample["conversations"]
        ids, labels, full = tokenize(self.tokenizer, conversations, self.max_length, self.system, self.image_tokens)
        assert any(label != IGNORE_INDEX for label in labels), f"sample {i}: start-up should have dropped it"
        # A cut leaves out the images after it: the first `placeholders` images are the ones kept.
        placeholders = ids.count(IMAGE_TOKEN_INDEX)
        paths = image_paths(sample, self.image_folder)[:placeholders]
        item = {"index": i, "id": sample["id"], "input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "pixel_values": None,
                "images": paths, "truncated": len(ids) < full, "bad": None}
        if not paths:
            return item
        # uint8: the model normalises on its device (a quarter of the bytes between processes)
        images = []
        for path in paths:
            try:
                image = load_image(path)
                pixels = to_pixels(image, self.image_size, self.image_mode, self.preprocessing)
                images.append(pixels)
            except LlavaMinError as e:
                if self.decode_errors == "raise":
                    raise LlavaMinError(f"{self.describe(i)}: {e}") from e
                return self.bad_item(item, path, str(e))
        item["pixel_values"] = torch.stack(images)                     # (n_images, 3, H, W)
        return item

    def bad_item(self, item: dict, path: str, error: str) -> dict:
        """`item` dropped from the loss: every label masked, placeholder pixels (zeros) for each of
        its images, so that a batch's shapes and its image placeholders still agree (packed rows
        too); item["bad"] says which sample, which file and what the decoder said."""
        item["labels"] = torch.full_like(item["labels"], IGNORE_INDEX)
        shape = (len(item["images"]), 3, self.image_size, self.image_size)
        item["pixel_values"] = torch.zeros(shape, dtype=torch.uint8)    # (n_images, 3, H, W)
        item["bad"] = {"index": item["index"], "id": item["id"], "file": path, "error": error,
                       "sample": self.describe(item["index"])}
        return item


def collate(samples: list[dict], pad_id: int = 0, shared: bool = False) -> dict:
    """Right-pad LLaVADataset items into a batch, one sample per row (XTuner's default_collate_fn);
    the mask comes from the lengths, as pad_id may be a real token (</s>). All the batch's images,
    in order, in one tensor: one ViT batch. shared=True stacks the pixels straight into shared
    memory (a loader worker's reused slot), so that sending the batch copies nothing, as torch's
    default_collate."""
    return _collate_rows([[s] for s in samples], pad_id, shared)


def collate_packed(samples: list[dict], capacity: int, image_tokens: int, pad_id: int = 0,
                   shared: bool = False) -> dict:
    """Pack whole samples into rows of at most `capacity` LLM positions by their real lengths,
    first-fit, longest first; attention_mask k on a row's k-th sample keeps its attention and
    positions to itself (LLaVA.forward). The sampler planned rows from estimates: one too low makes
    a row more here, never a sample split or cut."""
    sizes = [llm_positions(s["input_ids"].tolist(), image_tokens) for s in samples]
    rows = []
    room = []
    # Longest first; stable, so ties keep the sampler's order.
    for i in sorted(range(len(samples)), key=lambda i: -sizes[i]):
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
    """The batch of `rows`, each a list of samples laid end to end; attention_mask = k on the row's
    k-th sample."""
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
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": _stack_images(samples, shared),
            "image_counts": (input_ids == IMAGE_TOKEN_INDEX).sum(dim=1),
            "ids": [s["id"] for s in samples], "indices": [s["index"] for s in samples],
            # LLaVADataset(decode_errors="mark"): the samples dropped from the loss, an image not
            # decoding
            "bad": [s["bad"] for s in samples if s.get("bad")],
            "num_truncated": sum(bool(s.get("truncated")) for s in samples)}


def _stack_images(samples: list[dict], shared: bool) -> torch.Tensor | None:
    """(n_images, 3, H, W): every image of the samples, in order, or None. An item's pixel_values
    is (n, 3, H, W), or (3, H, W) for one image."""
    images = []
    for sample in samples:
        pixels = sample["pixel_values"]
        if pixels is not None and pixels.dim() == 3:
            pixels = pixels[None]
        count = 0
        if pixels is not None:
            count = pixels.shape[0]
            images.append(pixels)
        placeholders = int((sample["input_ids"] == IMAGE_TOKEN_INDEX).sum())
        if placeholders != count:
            raise LlavaMinError(f"sample {sample['index']} (id {sample['id']!r}): {placeholders} image "
                                f"placeholders but {count} images")
    if not images:
        return None
    shapes = {tuple(x.shape[1:]) for x in images}
    if len(shapes) > 1:
        shapes = {s["id"]: tuple(s["pixel_values"].shape) for s in samples if s["pixel_values"] is not None}
        raise LlavaMinError(f"images of one batch differ in shape: {shapes}; use one --image-size for all")
    total = sum(x.shape[0] for x in images)
    out = None
    if shared:
        out = shared_empty((total, *images[0].shape[1:]), images[0].dtype)
    return torch.cat(images, out=out)  # (n_images, 3, H, W), in row order


# `python -m llava_min.data check|show ...`: the commands live in tools/datacheck.py
if __name__ == "__main__":
    from llava_min.tools.datacheck import main
    main()
