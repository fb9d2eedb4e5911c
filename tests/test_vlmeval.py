"""llava_min/vlmeval.py against VLMEvalKit's rules, on TSVs in VLMEvalKit's layout with fixed
predictions.

Every expected figure below is worked out by hand from VLMEvalKit's code (the comment beside it
shows how): can_infer on the awkward answers ("A", "(B) cat", "The answer is C.", the option text
alone, two letters, an empty answer, a letter too early in a long answer); circular groups counting
only when every rotation is right; report_acc's rows with MMBench's abbreviations; YOrN_Extraction,
POPE_rating (F1, acc, precision, recall, the exploded category) and the default rating; VQA
accuracy over ten answers with the EvalAI normalisation. Also: the prompts LLaVA_XTuner builds
(hint, options, the Chinese instruction), the image reference and lazy reading (no image kept with
the rows), quoted newlines, and the errors for bad files, each naming file, index and column.
"""
import base64
import math

import pytest

from _bench_tsv import (MCQ_COLUMNS, VQA_COLUMNS, YORN_COLUMNS, mcq_rows, png_b64, pope_rows,
                        vqa_rows, write_tsv, yorn_rows)
from llava_min import LlavaMinError
from llava_min import vlmeval
from llava_min.vlmeval import can_infer, process_answer, yorn_extraction


def bench_of(tmp_path, name, columns, rows, **kw):
    return vlmeval.read_tsv(write_tsv(tmp_path / name, columns, rows), **kw)


def by_row(bench, predictions: dict) -> dict[int, str]:
    """predictions keyed by the file's index -> by row number, as score() takes them."""
    row_of = {int(bench.index(i)): i for i in range(len(bench.rows))}
    return {row_of[k]: v for k, v in predictions.items()}


# can_infer: utils/matching_util.py

CHOICES = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("answer, want", [
    ("A", "A"),
    ("(B) cat", "B"),                          # the letter wins over the text of another option
    ("The answer is C.", "C"),
    ("dog", "B"),                              # the option text alone
    ("It is a fish", "D"),                     # "a" is no option letter; "fish" is D's text
    ("A B", False),                            # two letters: none; no option text in "a b"
    ("", False),                               # empty
    ("nan", False),                            # what an empty cell becomes through pandas
    ("Z", "Z"),                                # "none of these"
    ("Cannot determine the answer", "Z"),
    ("A cat or a dog", False),                 # A stands 5th from the end; two option texts
    # C is not among the last 5 words
    ("I think the answer is option C because it is right", False),
    ("I think it is C of course", "C"),         # ...here it is
    ("cat " * 20, False),                       # over twice the options' text: no text match
])
def test_can_infer(answer, want):
    assert can_infer(answer, dict(CHOICES)) == want


# Multiple choice, circular (MMBench) and vanilla

def test_mmbench_circular_scores(tmp_path):
    rows, predictions = mcq_rows()
    bench = bench_of(tmp_path, "MMBench_DEV_EN_tiny.tsv", MCQ_COLUMNS, rows)
    assert bench.kind == "mcq" and bench.circular
    scored = vlmeval.score(bench, by_row(bench, predictions))
    # Groups: 1 all four right -> 1; 2 "A B" (two letters) wrong -> 0; 3 the empty answer -> 0; 4
    # the last copy's C stands too early -> 0. report_acc: Overall 1/4; CP = groups 1, 2: 1/2; LR =
    # groups 3, 4: 0; the categories likewise, sorted after the l2-categories; fractions.
    assert scored.report == {"Overall": 0.25, "CP": 0.5, "LR": 0.0, "future_prediction": 0.0,
                             "image_emotion": 0.5}
    assert list(scored.report) == ["Overall", "CP", "LR", "future_prediction", "image_emotion"]
    assert scored.scored == 4
    extracted = {int(bench.index(i)): e for i, e in scored.extracted.items()}
    assert extracted == {1: "A", 1000001: "D", 2000001: "C", 3000001: "B", 2: "Z", 1000002: "A",
                         3: "C", 1000003: "Z", 2000003: "A",
                         4: "B", 1000004: "A", 2000004: "D", 3000004: "Z"}
    group = {int(bench.index(i)): g for i, g in scored.group_hit.items()}
    assert group[3000001] == 1 and group[1000002] == 0 and group[2000003] == 0 and group[4] == 0


def test_the_same_rows_scored_vanilla_when_the_name_is_not_mmbench(tmp_path):
    rows, predictions = mcq_rows()
    bench = bench_of(tmp_path, "SEEDBench_tiny.tsv", MCQ_COLUMNS, rows)
    assert bench.kind == "mcq" and not bench.circular
    scored = vlmeval.score(bench, by_row(bench, predictions))
    # every row on its own: 4 + 1 + 2 + 3 of 13 right; CP rows (groups 1, 2) 5 of 6, LR rows 5 of 7
    assert scored.report == pytest.approx({"Overall": 10 / 13, "CP": 5 / 6, "LR": 5 / 7,
                                           "future_prediction": 5 / 7, "image_emotion": 5 / 6})


def test_circular_group_with_a_missing_rotation_is_not_scored(tmp_path):
    rows, predictions = mcq_rows()
    bench = bench_of(tmp_path, "MMBench_tiny.tsv", MCQ_COLUMNS, rows)
    del predictions[1000001]   # group 1 loses a rotation: the three scored groups are all wrong
    scored = vlmeval.score(bench, by_row(bench, predictions))
    assert scored.scored == 3 and scored.report["Overall"] == 0.0 and "CP" in scored.report


def test_mcq_prompts_as_llava_xtuner_builds_them(tmp_path):
    rows, _ = mcq_rows()
    # a tag in the text goes: the image comes first anyway
    rows[4]["question"] = "<image>\nIs the sky visible?"
    bench = bench_of(tmp_path, "MMBench_tiny.tsv", MCQ_COLUMNS, rows)
    prompts = {}
    for i in range(len(bench.rows)):
        prompts[int(bench.index(i))] = vlmeval.build_prompt(bench.rows[i], "mcq")
    assert prompts[1] == ("Which animal is shown?\nA. cat\nB. dog\nC. bird\nD. fish\n"
                          "Answer with the option's letter from the given choices directly.")
    assert prompts[2] == ("Look at the top.\n\nIs the sky visible?\nA. yes it is\nB. no\n"
                          "Answer with the option's letter from the given choices directly.")
    assert prompts[3] == "图中是什么动物？\nA. 猫\nB. 狗\nC. 鸟\n请直接回答选项字母。"
    # an English question with one Chinese option gets the Chinese instruction (cn_string of the
    # whole text)
    mixed = vlmeval.build_prompt({"question": "Which?", "A": "x", "B": "狗"}, "mcq")
    assert mixed.endswith("请直接回答选项字母。")
    assert vlmeval.build_prompt({"question": "Who?"}, "vqa") == \
        "Who?\nAnswer the question using a single word or phrase."
    assert vlmeval.build_prompt({"question": "Is it red?"}, "yorn") == "Is it red?"


def test_na_cells_are_absent_options_and_nan_predictions(tmp_path):
    # pandas reads "None", "NA" and "" as NaN: the option is absent, the prediction is the text
    # "nan"
    row = {"question": "q", "A": "x", "B": "y", "C": "None", "D": "", "hint": "NA"}
    assert vlmeval.options(row) == {"A": "x", "B": "y"}
    assert vlmeval.build_prompt(row, "mcq") == "q\nA. x\nB. y\n" + vlmeval.MCQ_SUFFIX
    assert [vlmeval.as_loaded(v) for v in ("", "None", "B")] == ["nan", "nan", "B"]


# Reading the file

def test_references_are_resolved_and_images_stay_in_the_file(tmp_path):
    rows, _ = mcq_rows()
    rows[0]["question"] = 'Which "animal"\nis shown?'   # a quoted cell: a newline, quotes
    bench = bench_of(tmp_path, "MMBench_tiny.tsv", MCQ_COLUMNS, rows)
    assert len(bench.rows) == 13 and bench.rows[0]["question"] == 'Which "animal"\nis shown?'
    # the base64 is read when a batch needs it
    assert all("image" not in row for row in bench.rows)
    copy = next(i for i in range(13) if bench.index(i) == "3000001")
    assert bench.image_row[copy] == 0
    assert vlmeval.image_cells(bench, copy) == [rows[0]["image"]]
    (image,) = vlmeval.load_images(bench, copy)
    assert image.size == (28, 28) and image.getpixel((0, 0)) == (40, 80, 160)


def test_a_list_of_images_in_one_row(tmp_path):
    rows = [{"index": 0, "question": "Same colour?", "answer": "Yes",
             "image": [png_b64((255, 0, 0)), png_b64((0, 0, 255))]}]
    bench = bench_of(tmp_path, "pair.tsv", YORN_COLUMNS, rows)
    images = vlmeval.load_images(bench, 0)
    assert [im.getpixel((0, 0)) for im in images] == [(255, 0, 0), (0, 0, 255)]


def test_bad_files_name_file_index_and_column(tmp_path):
    rows, _ = mcq_rows()
    rows[5]["image"] = "77"                 # index 2's copy refers to a missing row
    with pytest.raises(LlavaMinError, match=r"bad\.tsv: row with index 1000002 .*column 'image': refers to "
                                            r"index '77', which no row has"):
        bench_of(tmp_path, "bad.tsv", MCQ_COLUMNS, rows)
    bench = bench_of(tmp_path, "bad.tsv", MCQ_COLUMNS, rows, skip_bad=True)
    assert list(bench.bad) == [5]

    rows, _ = mcq_rows()
    rows[0]["B"] = ""                                          # an option column without options
    with pytest.raises(LlavaMinError, match=r"row with index 1 \(data row 1\), column 'B': empty"):
        bench_of(tmp_path, "bad2.tsv", MCQ_COLUMNS, rows)
    rows, _ = mcq_rows()
    rows[0]["answer"] = "D"
    rows[0]["D"] = ""
    with pytest.raises(LlavaMinError, match=r"index 1 .*column 'answer': 'D' is not one of"):
        bench_of(tmp_path, "bad3.tsv", MCQ_COLUMNS, rows)

    with pytest.raises(LlavaMinError, match=r"bad4\.tsv: no 'question' column"):
        bench_of(tmp_path, "bad4.tsv", ["index", "image"], [{"index": 1, "image": png_b64()}])
    with pytest.raises(LlavaMinError, match=r"neither an 'image' nor an 'image_path' column"):
        bench_of(tmp_path, "bad5.tsv", ["index", "question"], [{"index": 1, "question": "q"}])

    rows, _ = pope_rows()
    junk = b"not an image at all, but long enough to be no reference" * 2
    rows[2]["image"] = base64.b64encode(junk).decode()
    bench = bench_of(tmp_path, "POPE_bad.tsv", YORN_COLUMNS, rows)
    with pytest.raises(LlavaMinError, match=r"POPE_bad\.tsv: row with index 3 \(data row 3\), column 'image': the "
                                            r"image does not decode"):
        vlmeval.load_images(bench, 2)


def test_kind_by_content(tmp_path):
    assert bench_of(tmp_path, "a.tsv", YORN_COLUMNS, pope_rows()[0]).kind == "yorn"
    assert bench_of(tmp_path, "b.tsv", VQA_COLUMNS, vqa_rows()[0]).kind == "vqa"
    rows = pope_rows()[0]
    rows[0]["answer"] = "yes"               # not exactly Yes/No: open VQA, as VLMEvalKit
    assert bench_of(tmp_path, "c.tsv", YORN_COLUMNS, rows).kind == "vqa"


# Yes/no

@pytest.mark.parametrize("text, want", [("Yes", "Yes"), ("No, there is not.", "No"),
                                        ("yes and no", "Unknown"), ("There is a dog. Yes.", "Yes"),
                                        ("nan", "Unknown"), ("NO!", "No"),
                                        ("Yesterday", "Unknown")])
def test_yorn_extraction(text, want):
    assert yorn_extraction(text) == want


def test_pope_rating(tmp_path):
    rows, predictions = pope_rows()
    bench = bench_of(tmp_path, "POPE_tiny.tsv", YORN_COLUMNS, rows)
    scored = vlmeval.score(bench, by_row(bench, predictions))
    # Row 8 ("popular,random") is exploded into both categories before counting (POPE_rating), so
    # Overall sees 9 rows: TP rows 1, 7; FP rows 3, 8, 8; FN rows 4, 5 (Unknown is not Yes); TN
    # rows 2, 6. precision 2/5, recall 2/4, F1 2 * 0.4 * 0.5 / 0.9; acc 4 of 9; percent.
    f1 = 2 * 0.4 * 0.5 / 0.9 * 100
    want = {"Overall": f1, "acc": 400 / 9, "precision": 40.0, "recall": 50.0,
            "adversarial": {"Overall": 2 * 0.5 / 1.5 * 100, "acc": 200 / 3, "precision": 50.0,
                            "recall": 100.0},
            "popular": {"Overall": 0.0, "acc": 0.0, "precision": 0.0, "recall": 0.0},
            "random": {"Overall": 2 * 0.5 / 1.5 * 100, "acc": 200 / 3, "precision": 50.0,
                       "recall": 100.0}}
    assert scored.report.keys() == want.keys()
    for key, value in want.items():
        assert scored.report[key] == pytest.approx(value), key


def test_default_yorn_rating(tmp_path):
    rows, predictions = yorn_rows()
    bench = bench_of(tmp_path, "YesNo_tiny.tsv", YORN_COLUMNS, rows)
    scored = vlmeval.score(bench, by_row(bench, predictions))
    # rows right: 1 (Yes), 3 (NO -> No); wrong: 2, 4 (Unknown). Categories, then l2-categories, in
    # percent.
    want = {"Overall": 50.0, "c1": 50.0, "c2": 50.0, "l2a": 100 / 3, "l2b": 100.0}
    assert scored.report == pytest.approx(want)
    assert list(scored.report) == ["Overall", "c1", "c2", "l2a", "l2b"]


# Open VQA

@pytest.mark.parametrize("text, want", [("Coca Cola.", "coca cola"), ("coca-cola", "coca cola"),
                                        ("Two", "2"),
                                        ("the dog", "dog"), ("1,000", "1000"), ("dont", "don't"),
                                        ("3.5 m.", "3.5 m"), ("A (big) cat", "big cat")])
def test_evalai_normalisation(text, want):
    assert process_answer(text) == want


def test_vqa_accuracy_over_ten_answers(tmp_path):
    rows, predictions = vqa_rows()
    bench = bench_of(tmp_path, "TextVQA_VAL_tiny.tsv", VQA_COLUMNS, rows)
    scored = vlmeval.score(bench, by_row(bench, predictions))
    # k of 10 answers match -> mean over leaving each out of min(1, matches / 3): k=3 ("coca-cola"
    # normalises to "coca cola") 0.9; k=2 ("two" -> "2") 0.6; k=4 1.0; empty -> "nan" 0; a single
    # answer: exact match 1.0; "1,000" -> "1000", k=2 0.6.
    assert [scored.hit[i] for i in range(6)] == pytest.approx([0.9, 0.6, 1.0, 0.0, 1.0, 0.6])
    want = {"Overall": 4.1 / 6 * 100, "brand": 2.5 / 3 * 100, "misc": 1.6 / 3 * 100}
    assert scored.report == pytest.approx(want)


def test_rows_without_answers_are_not_scored(tmp_path):
    rows, predictions = vqa_rows()
    for row in rows:
        row["answer"] = None
    bench = bench_of(tmp_path, "TextVQA_TEST.tsv", VQA_COLUMNS, rows)
    scored = vlmeval.score(bench, by_row(bench, predictions))
    assert scored.scored == 0 and math.isnan(scored.report["Overall"])


def test_mme_rating(tmp_path):
    # two questions per image; category acc + acc+ (both of an image's questions right), percent
    cases = [("color", "a.jpg", "Yes", "Yes"), ("color", "a.jpg", "No", "No"),
             ("color", "b.jpg", "Yes", "Yes"), ("color", "b.jpg", "No", "Yes"),
             ("code_reasoning", "c.jpg", "Yes", "No"), ("code_reasoning", "c.jpg", "No", "No")]
    rows = [{"index": k, "question": "Is it?", "answer": a, "category": c, "image_path": path,
             "image": png_b64()} for k, (c, path, a, _) in enumerate(cases)]
    bench = bench_of(tmp_path, "MME.tsv", YORN_COLUMNS + ["image_path"], rows)
    scored = vlmeval.score(bench, {i: cases[i][3] for i in range(6)})
    # color: 3 of 4 right (75) + 1 of 2 images both right (50) = 125; code_reasoning: 50 + 0 = 50
    assert scored.report == {"perception": 125.0, "reasoning": 50.0, "color": 125.0, "code_reasoning": 50.0}


def test_vqa_methods_by_dataset_name():
    # ChartQA: within 5% for numbers; OCRVQA: case-blind equality, the best answer; DocVQA: ANLS >= 0.5
    assert vlmeval.vqa_hit("ChartQA_TEST", "10.4", "10") == 1.0
    assert vlmeval.vqa_hit("ChartQA_TEST", "10.6", "10") == 0.0
    assert vlmeval.vqa_hit("ChartQA_TEST", "51%", "0.5") == 1.0
    assert vlmeval.vqa_hit("OCRVQA_TEST", " Harry Potter", "['harry potter', 'x']") == 1.0
    assert vlmeval.vqa_hit("GQA_TestDev", "left", "right") == 0.0
    # "invoice" vs "invoices": distance 1 of 8 -> 0.875; "inv" vs "invoices": 5 of 8 -> 0.375 < 0.5 -> 0
    assert vlmeval.vqa_hit("DocVQA_VAL", "Invoice", "['invoices']") == pytest.approx(0.875)
    assert vlmeval.vqa_hit("DocVQA_VAL", "inv", "['invoices']") == 0.0
