"""VLMEvalKit's benchmark TSVs, offline: reading, prompts, answer extraction and scoring, as
VLMEvalKit does them.

Read top to bottom: the file (`read_tsv`: one pass that keeps each row's byte span, never its
base64 image), the kind of benchmark, the prompt LLaVA_XTuner builds, an image decoded from its row
when a batch needs it, then the exact-matching judge (`score`): `can_infer` for multiple choice
(circular groups for MMBench), `YOrN_Extraction` with POPE's or the default rating for yes/no, VQA
accuracy for open answers.

The rules are VLMEvalKit's (open-compass/VLMEvalKit): vlmeval/dataset/image_base.py (loading, image
references), image_mcq.py / image_yorn.py / image_vqa.py (evaluate), utils/multiple_choice.py
(report_acc, circular eval), utils/matching_util.py (can_infer), utils/yorn.py (YOrN_Extraction,
POPE_rating, default_rating), utils/vqa_eval.py and smp/misc.py (the EvalAI answer normalisation),
vlm/llava/llava_xtuner.py (build_prompt). VLMEvalKit loads every file through pandas; where that
changes a value (an empty cell, the text "None"), the same happens here, and the comment says so.
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from . import LlavaMinError
from .image import to_rgb

# pandas.read_csv's default missing-value strings: VLMEvalKit reads such a cell as NaN (an absent
# option or hint; a prediction that becomes the text "nan" through its str()).
NA_STRINGS = {
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
}
LETTERS = string.ascii_uppercase
# image_base.py: an `image` cell of 64 characters or fewer is the `index` of the row that holds the
# image.
REFERENCE_CHARS = 64
# MMBench's circular copies: index + k * 1e6; the group is index % 1e6
CIRCULAR_OFFSET = 1_000_000
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
MCQ_SUFFIX_CN = "请直接回答选项字母。"
VQA_SUFFIX = "Answer the question using a single word or phrase."
# utils/multiple_choice.py MMB_abbrs: MMBench's l2-categories by their short names in report_acc.
MMB_ABBRS = {
    "coarse_perception": "CP",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "logic_reasoning": "LR",
    "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
}
# vlm/llava/llava_xtuner.py build_gen_config: 5 new tokens for multiple choice and yes/no; 512
# otherwise.
MAX_NEW_TOKENS = {"mcq": 5, "yorn": 5, "vqa": 512}
SKIP_HINT = "; fix the file, or pass --skip-bad to leave such rows out"


def is_na(value) -> bool:
    return value is None or value in NA_STRINGS


def as_loaded(value) -> str:
    """A cell as VLMEvalKit's `str(x)` of pandas' value sees it: a missing one is 'nan'."""
    if is_na(value):
        return "nan"
    return str(value)


def cn_string(s: str) -> bool:
    """smp/misc.py cn_string: any CJK ideograph."""
    return re.search("[\u4e00-\u9fff]", s) is not None


# The file

@dataclass
class Bench:
    """A VLMEvalKit TSV, read once: the rows' cells except `image`, and where each row's image is
    in the file."""
    path: Path
    name: str                          # the file stem: circular evaluation, POPE's rating
    columns: list[str]
    rows: list[dict]                   # per row: column -> cell text (no `image`)
    spans: list[tuple[int, int]]       # per row: (byte offset, byte length) of its record
    image_row: list[int]               # per row: the row whose `image` cell holds its image
    kind: str = "vqa"                  # "mcq", "yorn" or "vqa"
    circular: bool = False
    bad: dict = field(default_factory=dict)   # row number -> why it is unusable (with skip_bad)

    def index(self, i: int) -> str:
        return self.rows[i]["index"]

    def where(self, i: int, column: str) -> str:
        return f"{self.path}: row with index {self.index(i)} (data row {i + 1}), column {column!r}"


def _records(f):
    """(offset, bytes) of each record of a TSV opened in binary: a newline inside a quoted cell (an
    even number of quote characters closes every quote) does not end the record."""
    offset = 0
    parts = []
    quotes = 0
    for line in f:
        parts.append(line)
        quotes += line.count(b'"')
        if quotes % 2 == 0:
            record = b"".join(parts)
            yield offset, record
            offset += len(record)
            parts = []
            quotes = 0
    if parts:
        yield offset, b"".join(parts)


def _cells(record: bytes, path, where: str) -> list[str]:
    try:
        text = record.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlavaMinError(f"{path}: {where} is not UTF-8 ({e}); VLMEvalKit's TSVs are "
                            "UTF-8") from e
    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    return rows[0] if rows else []


def read_tsv(path: str | Path, skip_bad: bool = False, need_images: bool = True) -> Bench:
    """Read a VLMEvalKit TSV: every cell but the base64 `image` kept, each row's byte span noted
    for later.

    Errors name the file, the row's index and the column; with skip_bad a bad row is noted in
    `bench.bad`."""
    path = Path(path)
    csv.field_size_limit(sys.maxsize)   # one base64 image is a single cell of megabytes
    rows = []
    spans = []
    # per row: a short `image` cell (a reference), else None; the base64 itself is not kept
    references = []
    with open(path, "rb") as f:
        records = _records(f)
        first = next(records, None)
        if first is None:
            raise LlavaMinError(f"{path}: empty file; a VLMEvalKit TSV starts with a header line "
                                "(index, question, ...)")
        columns = [c.strip() for c in _cells(first[1], path, "the header")]
        for column in ("index", "question"):
            if column not in columns:
                raise LlavaMinError(f"{path}: no {column!r} column (columns: {columns}); not a "
                                    "VLMEvalKit TSV")
        if need_images and "image" not in columns and "image_path" not in columns:
            raise LlavaMinError(f"{path}: neither an 'image' nor an 'image_path' column; the "
                                "model needs the images")
        image_at = None
        if "image" in columns:
            image_at = columns.index("image")
        for offset, record in records:
            if not record.strip():
                continue
            cells = _cells(record, path, f"the record at byte {offset}")
            if len(cells) != len(columns):
                raise LlavaMinError(f"{path}: the record at byte {offset} has {len(cells)} cells, "
                                    f"the header {len(columns)}; the file is cut or not "
                                    "tab-separated")
            row = {c: v for c, v in zip(columns, cells) if c != "image"}
            rows.append(row)
            spans.append((offset, len(record)))
            if image_at is not None and len(cells[image_at]) <= REFERENCE_CHARS:
                references.append(cells[image_at])
            else:
                references.append(None)

    bench = Bench(path, path.stem, columns, rows, spans, list(range(len(rows))))
    seen = {}
    for i, row in enumerate(rows):
        if row["index"] in seen:
            first = seen[row["index"]] + 1
            raise LlavaMinError(f"{bench.where(i, 'index')}: the same index as data row {first}")
        seen[row["index"]] = i
    if image_at is not None:
        _resolve_references(bench, references, seen, skip_bad)
    bench.kind = detect_kind(bench)
    # ImageMCQDataset evaluates circularly when rows carry g_index (its MMBench datasets); here the
    # file's name decides, as it names the dataset in VLMEvalKit.
    name = bench.name.lower()
    bench.circular = bench.kind == "mcq" and ("mmbench" in name or "circular" in name)
    if bench.kind == "mcq":
        _check_options(bench, skip_bad)
    if bench.circular:
        for i, row in enumerate(rows):
            if not row["index"].lstrip("-").isdigit():
                where = bench.where(i, "index")
                raise LlavaMinError(f"{where}: {row['index']!r} is not an integer; circular "
                                    "evaluation groups rows by index % 1000000")
    return bench


def _resolve_references(bench: Bench, references: list[str | None], row_of: dict,
                        skip_bad: bool) -> None:
    """image_base.py: an `image` cell of 64 characters or fewer names the row whose cell holds the
    base64 image. references: per row its short cell, or None where the cell is an image."""
    for i, cell in enumerate(references):
        if cell is None:
            continue
        target = row_of.get(cell.strip())
        problem = None
        if target is None:
            problem = f"refers to index {cell!r}, which no row has"
        elif references[target] is not None:
            problem = (f"refers to index {cell!r}, whose image cell is itself a reference "
                       f"({references[target]!r})")
        if problem is None:
            bench.image_row[i] = target
            continue
        message = f"{bench.where(i, 'image')}: {problem}"
        if not skip_bad:
            raise LlavaMinError(message + SKIP_HINT)
        bench.bad[i] = message


def detect_kind(bench: Bench) -> str:
    """As VLMEvalKit types a custom TSV: A and B columns -> multiple choice; every answer Yes or No
    -> yes/no; otherwise open VQA."""
    if "A" in bench.columns and "B" in bench.columns:
        return "mcq"
    if "answer" in bench.columns:
        answers = [row["answer"] for row in bench.rows]
        if answers and all(a in ("Yes", "No") for a in answers):
            return "yorn"
    return "vqa"


def options(row: dict) -> dict[str, str]:
    """build_choices: the present option columns A, B, ... in order (pandas NaN = absent)."""
    return {c: row[c] for c in LETTERS if c in row and not is_na(row[c])}


def _check_options(bench: Bench, skip_bad: bool) -> None:
    for i, row in enumerate(bench.rows):
        choices = options(row)
        problem = None
        if "A" not in choices or "B" not in choices:
            column = "B"
            if "A" not in choices:
                column = "A"
            where = bench.where(i, column)
            problem = f"{where}: empty; a multiple-choice row needs options A and B"
        elif has_answer(row) and row["answer"] not in choices:
            problem = (f"{bench.where(i, 'answer')}: {row['answer']!r} is not one of the row's "
                       f"options {list(choices)}")
        if problem is None:
            continue
        if not skip_bad:
            raise LlavaMinError(problem + SKIP_HINT)
        bench.bad.setdefault(i, problem)


def has_answer(row: dict) -> bool:
    """Rows without an answer (TEST splits) are predicted and not scored."""
    return not is_na(row.get("answer"))


# Prompts: vlm/llava/llava_xtuner.py build_prompt for multiple choice, the dataset's own otherwise

def build_prompt(row: dict, kind: str) -> str:
    """The text LLaVA_XTuner sends, without image tags (generate_inner drops them and puts
    "<image>\\n" first)."""
    question = row["question"]
    if kind == "mcq":
        if not is_na(row.get("hint")):
            question = row["hint"] + "\n" + question
        for letter, text in options(row).items():
            question += f"\n{letter}. {text}"
        # The Chinese instruction when the question, hint or any option holds a CJK character
        # (cn_string).
        suffix = MCQ_SUFFIX_CN if cn_string(question) else MCQ_SUFFIX
        prompt = question + "\n" + suffix
    elif kind == "vqa":
        # ImageVQADataset.build_prompt (LLaVA-1.5's instruction)
        prompt = question + "\n" + VQA_SUFFIX
    else:
        prompt = question                          # ImageYORNDataset: the question as it is
    return prompt.replace("<image>", "")


# Images, decoded only when a batch needs them

def image_cells(bench: Bench, i: int) -> list[str]:
    """The base64 strings of row i's images, read from the file (toliststr: a cell "[...]" is a
    list)."""
    offset, length = bench.spans[bench.image_row[i]]
    with open(bench.path, "rb") as f:
        f.seek(offset)
        record = f.read(length)
    cell = _cells(record, bench.path, f"row {bench.index(i)}")[bench.columns.index("image")]
    if cell.startswith("[") and cell.endswith("]"):
        try:
            return [str(x) for x in ast.literal_eval(cell)]
        except (ValueError, SyntaxError) as e:
            raise LlavaMinError(f"{bench.where(i, 'image')}: a list of images that does not parse "
                                f"({e})") from e
    return [cell]


def decode_image(data: str, where: str) -> Image.Image:
    try:
        raw = base64.b64decode(data, validate=False)
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image), where)
    except (binascii.Error, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise LlavaMinError(f"{where}: the image does not decode ({type(e).__name__}: {e})") from e


def load_images(bench: Bench, i: int, image_folder: Path | None = None) -> list[Image.Image]:
    """Row i's images: base64 from the file, or `image_path` files (relative to image_folder, else
    the TSV's)."""
    if "image" in bench.columns:
        cells = image_cells(bench, i)
        return [decode_image(c, bench.where(i, "image")) for c in cells]
    cell = bench.rows[i]["image_path"]
    paths = [cell]
    if cell.startswith("[") and cell.endswith("]"):
        paths = ast.literal_eval(cell)
    folder = image_folder or bench.path.parent
    images = []
    for p in paths:
        try:
            with Image.open(folder / p) as image:
                image.load()
                images.append(to_rgb(ImageOps.exif_transpose(image), str(folder / p)))
        except OSError as e:
            where = bench.where(i, "image_path")
            raise LlavaMinError(f"{where}: {folder / p}: {type(e).__name__}: {e}") from e
    return images


# Multiple choice: utils/matching_util.py

def can_infer_option(answer: str, choices: dict) -> str | bool:
    """An option letter standing alone as a word of the answer (after .()[],:;!*#{} become spaces),
    if exactly one of the choices' letters does; 'Z' for a refusal. VLMEvalKit's quirks kept: the
    letter must be among the last five words (a letter earlier in a long answer does not count),
    and a lone 'Z' means "none"."""
    if "Failed to obtain answer via API" in answer:
        return False
    for refusal in ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                    "I'm sorry, but without the image provided", "Cannot determine the answer"):
        if refusal in answer:
            return "Z"
    for c in ".()[],:;!*#{}":
        answer = answer.replace(c, " ")
    splits = [x.strip() for x in answer.split()]
    count = sum(1 for c in choices if c in splits)
    if count == 1:
        for ch in choices:
            if ch in splits and splits.index(ch) > len(splits) - 5:
                return ch
    # count_choice(splits, {'Z', ''}): '' is never a word of str.split(), so this is "Z" alone.
    elif count == 0 and "Z" in splits:
        return "Z"
    return False


def can_infer_text(answer: str, choices: dict) -> str | bool:
    """The one option whose text (lower-cased) occurs in the answer; nothing for an answer over
    twice as long as all option texts together."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    hits = [k for k, v in choices.items() if str(v).lower() in answer]
    if len(hits) == 1:
        return hits[0]
    return False


def can_infer(answer, choices: dict) -> str | bool:
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def extract_option(prediction: str, row: dict) -> str:
    """extract_answer_from_item under the exact_matching judge: can_infer on the stripped
    prediction, else 'Z'."""
    return can_infer(prediction.strip(), options(row)) or "Z"


# Yes/no: utils/yorn.py, and the EvalAI normalisation of utils/vqa_eval.py / smp/misc.py

_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# VLMEvalKit's pattern as written: "(?!<=" is a lookahead (the intended look-behind is a typo), so
# any period not followed by a digit goes, "3." and "a.m." included.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def process_punctuation(text: str) -> str:
    """smp/misc.py process_punctuation. Quirks kept: a digit,digit anywhere deletes every
    punctuation mark instead of spacing it; re.UNICODE is passed as sub's count, so at most 32
    periods go."""
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """vqa_eval.py _process_digit_article: lower case, number words to digits, articles dropped,
    contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def process_answer(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def yorn_extraction(output: str) -> str:
    """YOrN_Extraction: 'Yes' or 'No' when exactly one of the two words occurs, else 'Unknown'."""
    words = process_punctuation(output.lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "yes" not in words and "no" in words:
        return "No"
    return "Unknown"


# Open VQA: utils/vqa_eval.py process_line

def answer_list(answer: str) -> list[str] | None:
    """istype(answer, list): a cell that evaluates to a Python list (TextVQA's ten answers), else
    None."""
    try:
        value = ast.literal_eval(answer)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(value, list):
        return [str(x) for x in value]
    return None


def vqa_score(prediction: str, answer: str) -> float:
    """A list of answers: the VQA accuracy, min(1, matches among the other answers / 3) averaged
    over leaving out each answer in turn (as VLMEvalKit and the official VQA code). One answer:
    exact match after normalisation. (VLMEvalKit's vqa_score gives a lone answer 0, as it has no
    other answers to match; exact match is what its fallback method does and what a user expects.)"""
    pred = process_answer(prediction)
    answers = answer_list(answer)
    if answers is None:
        return float(process_answer(answer) == pred)
    gts = [process_answer(a) for a in answers]
    matches = []
    for k in range(len(gts)):
        others = gts[:k] + gts[k + 1:]
        matches.append(min(1.0, sum(g == pred for g in others) / 3))
    return float(np.mean(matches)) if matches else 0.0


def _levenshtein(a: str, b: str) -> int:
    if len(a) > len(b):
        a, b = b, a
    distances = list(range(len(a) + 1))
    for j, cb in enumerate(b):
        row = [j + 1]
        for i, ca in enumerate(a):
            if ca == cb:
                row.append(distances[i])
            else:
                row.append(1 + min(distances[i], distances[i + 1], row[-1]))
        distances = row
    return distances[-1]


def anls(prediction: str, answers: list[str]) -> float:
    """vqa_eval.py anls_compute + hit_calculate (DocVQA, InfoVQA): 1 - the smallest normalised edit
    distance to an answer, 0 below 0.5."""
    pred = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(gt), len(pred))
        distances.append(0.0 if length == 0 else _levenshtein(gt, pred) / length)
    value = 1 - min(distances)
    if value < 0.5:
        return 0.0
    return value


def relaxed_correct(target: str, prediction: str) -> bool:
    """vqa_eval.py relaxed_correctness (ChartQA): numbers within 5% (a trailing % read as /100),
    anything else equal up to case."""
    def number(text):
        try:
            if text.endswith("%"):
                return float(text.rstrip("%")) / 100.0
            return float(text)
        except ValueError:
            return None

    p = number(prediction)
    t = number(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= 0.05
    return prediction.lower() == target.lower()


def vqa_hit(bench_name: str, prediction: str, answer: str) -> float:
    """image_vqa.py evaluate: the method by the dataset's name (listinstr, case-sensitive): ChartQA
    relaxed accuracy, OCRVQA and GQA accuracy, DocVQA and InfoVQA ANLS, otherwise VQA accuracy."""
    answers = answer_list(answer)
    if answers is None:
        answers = [answer]
    if "ChartQA" in bench_name:
        return float(max(relaxed_correct(a, prediction.strip()) for a in answers))
    if "OCRVQA" in bench_name or "GQA" in bench_name:
        matches = [float(a.strip().lower() == prediction.strip().lower()) for a in answers]
        if "OCRVQA" in bench_name:
            return max(matches)
        return float(np.mean(matches))
    if "DocVQA" in bench_name or "InfoVQA" in bench_name:
        return anls(prediction, answers)
    return vqa_score(prediction, answer)


# Scoring

@dataclass
class Scored:
    """Per row what the judge extracted and whether it hit, and the report (VLMEvalKit's table as a
    dict)."""
    extracted: dict[int, str]
    hit: dict[int, float]
    group_hit: dict[int, int]          # circular: per row, its group's verdict
    report: dict
    scored: int                        # rows (circular: groups) that counted


def score(bench: Bench, predictions: dict[int, str]) -> Scored:
    """VLMEvalKit's exact-matching judge over the rows that have a prediction and an answer.
    predictions: row number -> the model's text (a missing row is not scored)."""
    rows = [i for i in sorted(predictions) if has_answer(bench.rows[i])]
    extracted = {}
    hit = {}
    for i in rows:
        row = bench.rows[i]
        prediction = as_loaded(predictions[i])
        if bench.kind == "mcq":
            extracted[i] = extract_option(prediction, row)
            hit[i] = float(extracted[i] == row["answer"])
        elif bench.kind == "yorn":
            extracted[i] = yorn_extraction(prediction)
            hit[i] = float(extracted[i] == row["answer"])
        else:
            extracted[i] = process_answer(prediction)
            hit[i] = vqa_hit(bench.name, prediction, row["answer"])
    if bench.kind == "mcq":
        return _score_mcq(bench, rows, extracted, hit)
    # image_yorn.py: the rating by the dataset's name (listinstr, case-sensitive), MME's before POPE's.
    if bench.kind == "yorn" and "MME" in bench.name:
        report = mme_rating(bench, rows, hit)
    elif bench.kind == "yorn" and "POPE" in bench.name:
        report = pope_rating(bench, rows, extracted, hit)
    elif bench.kind == "yorn":
        report = default_rating(bench, rows, hit)
    else:
        report = vqa_rating(bench, rows, hit)
    return Scored(extracted, hit, {}, report, len(rows))


def _score_mcq(bench: Bench, rows: list[int], extracted: dict, hit: dict) -> Scored:
    if not bench.circular:
        return Scored(extracted, hit, {}, report_acc(bench, rows, hit), len(rows))
    # mcq_circular_eval: a group (index % 1e6) counts once, on its main row (index == group), and
    # only if every rotation hit. A group with a rotation left out (no prediction, skipped) is not
    # scored at all.
    members: dict[int, list[int]] = {}
    for i in range(len(bench.rows)):
        members.setdefault(int(bench.index(i)) % CIRCULAR_OFFSET, []).append(i)
    have = set(rows)
    main = []
    group_hit = {}
    verdict = {}
    for i in rows:
        g = int(bench.index(i)) % CIRCULAR_OFFSET
        if int(bench.index(i)) != g or not all(m in have for m in members[g]):
            continue
        main.append(i)
        verdict[i] = float(all(hit[m] == 1.0 for m in members[g]))
        for m in members[g]:
            group_hit[m] = int(verdict[i])
    return Scored(extracted, hit, group_hit, report_acc(bench, main, verdict), len(main))


def _by_split(bench: Bench, rows: list[int], value) -> dict:
    """One figure, or {split: figure} when the file has a `split` column (report_acc's one row per
    split)."""
    if "split" not in bench.columns:
        return value(rows)
    splits = sorted({bench.rows[i]["split"] for i in rows})
    if len(splits) == 1:
        return value(rows)
    return {sp: value([i for i in rows if bench.rows[i]["split"] == sp]) for sp in splits}


def _groups(bench: Bench, rows: list[int], column: str) -> dict[str, list[int]]:
    """Rows by the values of `column`, sorted by value, missing values left out (as pandas'
    NaN)."""
    if column not in bench.columns:
        return {}
    groups: dict[str, list[int]] = {}
    for i in rows:
        value = bench.rows[i][column]
        if not is_na(value):
            groups.setdefault(value, []).append(i)
    return dict(sorted(groups.items()))


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def report_acc(bench: Bench, rows: list[int], hit: dict) -> dict:
    """utils/multiple_choice.py report_acc: Overall, each l2-category, each category (MMBench's
    abbreviations); fractions, as VLMEvalKit prints them."""
    def acc(subset):
        return _mean(hit[i] for i in subset)

    report = {"Overall": _by_split(bench, rows, acc)}
    for column in ("l2-category", "category"):
        for value, subset in _groups(bench, rows, column).items():
            report[MMB_ABBRS.get(value, value)] = _by_split(bench, subset, acc)
    return report


def default_rating(bench: Bench, rows: list[int], hit: dict) -> dict:
    """utils/yorn.py default_rating: Overall, each category, each l2-category, in percent."""
    report = {"Overall": _mean(hit[i] for i in rows) * 100}
    for column in ("category", "l2-category"):
        for value, subset in _groups(bench, rows, column).items():
            report[value] = _mean(hit[i] for i in subset) * 100
    return report


MME_SUPER = {
    "perception": ["OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position",
                   "posters", "scene"],
    "reasoning": ["code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation"],
}


def mme_rating(bench: Bench, rows: list[int], hit: dict) -> dict:
    """utils/yorn.py MME_rating: per category acc + acc+ (the share of images whose two questions are both
    right), in percent, summed into perception and reasoning first. An image is its `image_path`, else the row
    that holds its image (MME's second question refers to the first's)."""
    stats: dict[str, dict[str, list[float]]] = {}
    for i in rows:
        image = bench.rows[i].get("image_path") or str(bench.image_row[i])
        stats.setdefault(bench.rows[i].get("category", ""), {}).setdefault(image, []).append(hit[i])
    scores = {}
    for category, images in stats.items():
        normal = _mean(v for values in images.values() for v in values) * 100
        # VLMEvalKit multiplies the first two answers of each image: an image needs both questions
        plus = _mean(values[0] * values[1] for values in images.values() if len(values) >= 2) * 100
        scores[category] = normal + plus
    report = {}
    for name, categories in MME_SUPER.items():
        report[name] = sum(scores[c] for c in categories if c in scores)
    report.update(scores)
    return report


def _pope_row(pairs: list[tuple[str, str, float]]) -> dict:
    """F1 (as 'Overall'), accuracy, precision and recall of 'Yes', in percent, from (answer,
    extracted, hit)."""
    tp = sum(1 for a, e, _ in pairs if a == "Yes" and e == "Yes")
    fp = sum(1 for a, e, _ in pairs if a != "Yes" and e == "Yes")
    fn = sum(1 for a, e, _ in pairs if a == "Yes" and e != "Yes")
    precision = tp / (tp + fp) if tp + fp else 0
    recall = tp / (tp + fn) if tp + fn else 0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0
    return {"Overall": f1 * 100, "acc": _mean(h for _, _, h in pairs) * 100,
            "precision": precision * 100, "recall": recall * 100}


def pope_rating(bench: Bench, rows: list[int], extracted: dict, hit: dict) -> dict:
    """utils/yorn.py POPE_rating: the Overall row's F1, acc, precision and recall as keys, then one
    entry per category. VLMEvalKit's quirk kept: a category cell "a,b" is exploded into one row per
    category before anything is counted, so such a row counts twice in Overall too."""
    exploded = []
    for i in rows:
        categories = [None]
        if "category" in bench.columns and not is_na(bench.rows[i]["category"]):
            categories = bench.rows[i]["category"].split(",")
        for c in categories:
            exploded.append((c, bench.rows[i]["answer"], extracted[i], hit[i]))
    report = _pope_row([(a, e, h) for _, a, e, h in exploded])
    for c in sorted({c for c, *_ in exploded if c is not None and c not in NA_STRINGS}):
        report[c] = _pope_row([(a, e, h) for k, a, e, h in exploded if k == c])
    return report


def vqa_rating(bench: Bench, rows: list[int], hit: dict) -> dict:
    """image_vqa.py evaluate: each split then Overall where the file has splits, else Overall and
    each category; in percent."""
    report = {}
    if "split" in bench.columns:
        for sp in sorted({bench.rows[i]["split"] for i in rows}):
            report[sp] = _mean(hit[i] for i in rows if bench.rows[i]["split"] == sp) * 100
        report["Overall"] = _mean(hit[i] for i in rows) * 100
        return report
    report["Overall"] = _mean(hit[i] for i in rows) * 100
    for value, subset in _groups(bench, rows, "category").items():
        report[value] = _mean(hit[i] for i in subset) * 100
    return report


def table(report: dict, title: str) -> str:
    """The report as VLMEvalKit's table prints it: one line per key (per split or field where it
    has several)."""
    lines = [title]
    for key, value in report.items():
        if isinstance(value, dict):
            cells = "  ".join(f"{k} {v:.4f}" for k, v in value.items())
            lines.append(f"  {key:<28} {cells}")
        else:
            lines.append(f"  {key:<28} {value:.4f}")
    return "\n".join(lines)


# Predictions files

def read_predictions(path: str | Path, bench: Bench) -> dict[int, str]:
    """index -> prediction from a TSV or CSV with `index` and `prediction` columns (llava-min's
    predictions.tsv, or VLMEvalKit's inference output saved as .tsv / .csv); returned by row number
    of `bench`."""
    path = Path(path)
    if path.suffix.lower() in (".xlsx", ".xls"):
        raise LlavaMinError(f"{path}: an Excel file; save it as .tsv or .csv (VLMEvalKit: "
                            "PRED_FORMAT=tsv)")
    csv.field_size_limit(sys.maxsize)
    delimiter = "\t"
    if path.suffix.lower() == ".csv":
        delimiter = ","
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = reader.fieldnames or []
        for column in ("index", "prediction"):
            if column not in fields:
                raise LlavaMinError(f"{path}: no {column!r} column (columns: {fields}); a "
                                    "predictions file has 'index' and 'prediction'")
        row_of = {bench.index(i): i for i in range(len(bench.rows))}
        out = {}
        for n, rec in enumerate(reader):
            key = rec["index"].strip()
            if key not in row_of:
                raise LlavaMinError(f"{path}: line {n + 2}, column 'index': {key!r} is no row of "
                                    f"{bench.path}; the predictions belong to another benchmark "
                                    "file")
            out[row_of[key]] = rec["prediction"] or ""
    return out
