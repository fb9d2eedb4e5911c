"""Evaluation: exact match on a held-out test.json, or VLMEvalKit's benchmark TSVs scored as
VLMEvalKit does.

    python -m llava_min.eval --model out/stage2 --data data/shapes/test.json \
        --image-folder data/shapes
    python -m llava_min.eval --model out/finetune --data MMBench_DEV_EN.tsv [--out DIR]
    torchrun --nproc_per_node 4 -m llava_min.eval --model out/finetune --data SEEDBench_IMG.tsv
    python -m llava_min.eval --data MMBench_DEV_EN.tsv --predictions PRED.tsv   # score only

test.json is a list of {"id", "image", "question", "answer"} ("image" one file or a list); answers
are compared after lower-casing and stripping surrounding punctuation and white space. One JSON
line per sample goes to
--answers (default MODEL/eval_answers.jsonl); the last line printed is a JSON summary with
"accuracy".

A .tsv is one of VLMEvalKit's files (llava_min/vlmeval.py: reading, prompts, the exact-matching
judge). Its rows are answered greedily in left-padded batches with the static KV cache, images
decoded in loader workers as each batch is built; under torchrun each rank answers every N-th row
and rank 0 merges. OUT (default MODEL/eval/<file stem>/) receives, atomically per batch,
predictions.partial/rank-R.jsonl (a killed run started again with the same --out answers only the
rest), then predictions.tsv (the input's columns but `image`, `prediction`, `extracted`, `hit`) and
scores.json (VLMEvalKit's report rows as keys); the table is printed, and the last line is the
scores as JSON.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import string
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import LlavaMinError, dist, vlmeval
from .chat import load_for_inference, prompt_ids
from .image import IMAGENET, Preprocessing, load_image, preprocess, to_pixels
from .loader import Loader, shared_empty

_STRIP = string.punctuation + string.whitespace


# test.json: exact match

def normalise(text: str) -> str:
    return text.strip(_STRIP).lower().strip(_STRIP)


def load_test_set(path: str | Path) -> list[dict]:
    items = json.loads(Path(path).read_text())
    if not isinstance(items, list):
        raise LlavaMinError(f"{path}: expected a JSON list of {{id, image, question, answer}} "
                            "objects")
    for i, item in enumerate(items):
        missing = [k for k in ("id", "question", "answer") if k not in item]
        if missing:
            raise LlavaMinError(f"{path}: item {i} (id {item.get('id')!r}) lacks {missing}")
    return items


def image_files(item: dict) -> list[str]:
    """An item's "image": none, one file name, or a list of them."""
    image = item.get("image")
    if not image:
        return []
    if isinstance(image, str):
        return [image]
    return list(image)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask, every prompt ending at the last column, so that generation appends in
    step."""
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, T - len(p):] = 1
    return ids, mask


def decode_rows(tok, model, new: torch.Tensor) -> list[str]:
    """Generated ids -> texts, stop ids dropped, surrounding white space stripped (VLMEvalKit's
    .strip())."""
    stop = set(model.config.stop_ids)
    return [tok.decode([t for t in row if t not in stop]).strip() for row in new.tolist()]


@torch.no_grad()
def evaluate(model, tok, items: list[dict], image_folder: str | Path | None, batch_size: int = 16,
             max_new_tokens: int = 16) -> list[dict]:
    device = next(model.parameters()).device
    folder = Path(image_folder) if image_folder else Path(".")
    results = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        prompts = [prompt_ids(tok, it["question"], len(image_files(it))) for it in batch]
        ids, mask = left_pad(prompts, model.config.pad_id)
        # Every image of every item, items in order and each item's images in order (row-major).
        size = model.config.image_size
        images = []
        for f in [f for it in batch for f in image_files(it)]:
            images.append(preprocess(load_image(folder / f), size, mode=model.config.image_mode,
                                     preprocessing=model.vit.config.preprocessing))
        pixels = torch.stack(images).to(device) if images else None
        new = model.generate(ids.to(device), pixels, max_new_tokens=max_new_tokens,
                             attention_mask=mask.to(device))
        for it, text in zip(batch, decode_rows(tok, model, new)):
            correct = normalise(text) == normalise(str(it["answer"]))
            results.append({"id": it["id"], "question": it["question"], "answer": it["answer"],
                            "prediction": text, "correct": correct})
    return results


def run_test_json(args) -> None:
    model, tok = load_for_inference(args.model, args.device)
    items = load_test_set(args.data)
    t0 = time.time()
    max_new_tokens = args.max_new_tokens or 16
    results = evaluate(model, tok, items, args.image_folder, args.batch_size, max_new_tokens)
    out = Path(args.answers) if args.answers else Path(args.model) / "eval_answers.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in results))
    correct = sum(r["correct"] for r in results)
    summary = {"accuracy": correct / max(len(results), 1), "correct": correct,
               "total": len(results), "seconds": round(time.time() - t0, 2), "answers": str(out)}
    print(json.dumps(summary))


# A TSV: the rows a batch needs, built in loader workers

class BenchRows:
    """bench row i -> its prompt ids and uint8 pixels, the images decoded from the file only now
    (in a worker). An image that does not decode gives {"row": i, "bad": why}: the main process
    stops, or skips it (--skip-bad)."""

    def __init__(self, bench: vlmeval.Bench, tok, image_size: int, image_mode: str,
                 image_folder=None, preprocessing: Preprocessing = IMAGENET):
        self.bench = bench
        self.tok = tok
        self.image_size = image_size
        self.image_mode = image_mode
        self.preprocessing = preprocessing
        self.image_folder = None
        if image_folder:
            self.image_folder = Path(image_folder)
        self.with_images = "image" in bench.columns or "image_path" in bench.columns

    def describe(self, i: int) -> str:
        return self.bench.where(i, "image")

    def __getitem__(self, i: int) -> dict:
        images = []
        if self.with_images:
            try:
                images = vlmeval.load_images(self.bench, i, self.image_folder)
            except LlavaMinError as e:
                return {"row": i, "bad": str(e)}
        prompt = vlmeval.build_prompt(self.bench.rows[i], self.bench.kind)
        pixels = []
        for image in images:
            pixels.append(to_pixels(image, self.image_size, self.image_mode, self.preprocessing))
        return {"row": i, "ids": prompt_ids(self.tok, prompt, len(images)), "pixels": pixels}


def collate_rows(samples: list[dict], pad_id: int = 0) -> dict:
    good = [s for s in samples if "bad" not in s]
    bad = {s["row"]: s["bad"] for s in samples if "bad" in s}
    batch = {"rows": [s["row"] for s in good], "bad": bad}
    if not good:
        return batch
    batch["input_ids"], batch["attention_mask"] = left_pad([s["ids"] for s in good], pad_id)
    pixels = [p for s in good for p in s["pixels"]]
    batch["pixel_values"] = None
    if pixels:
        # built in the worker's shared memory: handing the batch to the main process copies nothing
        batch["pixel_values"] = shared_empty((len(pixels), *pixels[0].shape), torch.uint8)
        torch.stack(pixels, out=batch["pixel_values"])
    return batch


class _Collate:
    """collate_rows with the model's pad id, picklable for the loader's workers."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples):
        return collate_rows(samples, self.pad_id)


# A TSV: what is already answered, and appending more

PARTIAL = "predictions.partial"


def read_partial(out: Path, bench: vlmeval.Bench) -> dict[int, dict]:
    """row -> {"prediction"} or {"skipped"} from every rank's file of an earlier (killed) run; a
    torn last line (the process died inside a write) is ignored."""
    row_of = {bench.index(i): i for i in range(len(bench.rows))}
    done = {}
    for f in sorted((out / PARTIAL).glob("rank-*.jsonl")):
        for n, line in enumerate(f.read_text(encoding="utf-8").split("\n")[:-1]):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlavaMinError(f"{f}: line {n + 1} is not JSON ({e}); the file was changed by "
                                    f"hand? Delete {out / PARTIAL} to start over") from e
            if record["index"] not in row_of:
                raise LlavaMinError(f"{f}: line {n + 1} answers index {record['index']!r}, which "
                                    f"{bench.path} has no row for; this --out holds another "
                                    "benchmark's run: use another --out")
            done[row_of[record["index"]]] = record
    return done


def check_same_run(out: Path, run: dict) -> None:
    """An --out holds one run: the same file, model and settings; a resume with others would mix
    predictions."""
    f = out / PARTIAL / "run.json"
    if f.exists():
        before = json.loads(f.read_text())
        changed = {k: (before.get(k), v) for k, v in run.items() if before.get(k) != v}
        if changed:
            listed = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
            raise LlavaMinError(f"{out}: holds predictions of another run ({listed}); use another "
                                f"--out, or delete {out / PARTIAL} to start over")
        return
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".run.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(run, indent=1) + "\n")
    tmp.replace(f)


class Appender:
    """Append one batch's records to a rank's JSONL in one write() and fsync: a kill leaves whole
    batches (and at most a torn tail, cut off when the file is opened again)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def write(self, records: list[dict]) -> None:
        if records:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            os.write(self.fd, text.encode("utf-8"))
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


@torch.no_grad()
def answer_rows(model, tok, bench, rows: list[int], args, appender: Appender,
                show: bool) -> dict[int, dict]:
    """Generate for `rows` in batches; each batch appended to the rank's file before the next
    starts."""
    device = next(model.parameters()).device
    dataset = BenchRows(bench, tok, model.config.image_size, model.config.image_mode,
                        args.image_folder, model.vit.config.preprocessing)
    batches = [rows[k:k + args.batch_size] for k in range(0, len(rows), args.batch_size)]
    loader = Loader(dataset, batches, _Collate(model.config.pad_id), num_workers=args.num_workers)
    results = {}
    # rank 0 shows rows/s and the time left, on a terminal (disable=None: not into a log file)
    hide = None
    if not show:
        hide = True
    bar = tqdm(total=len(rows), unit="row", desc=bench.name, disable=hide, dynamic_ncols=True)
    with bar:
        for batch in loader:
            if batch["bad"] and not args.skip_bad:
                first = next(iter(batch["bad"].values()))
                raise LlavaMinError(f"{first}; fix the file, or pass --skip-bad to leave such "
                                    f"rows out (the rows answered so far are kept in "
                                    f"{appender.path} for a rerun with this --out)")
            answered = {}
            for i, why in batch["bad"].items():
                answered[i] = {"index": bench.index(i), "skipped": why}
            if batch["rows"]:
                pixels = batch["pixel_values"]
                if pixels is not None:
                    pixels = pixels.to(device)
                new = model.generate(batch["input_ids"].to(device), pixels,
                                     max_new_tokens=args.max_new_tokens,
                                     attention_mask=batch["attention_mask"].to(device))
                for i, text in zip(batch["rows"], decode_rows(tok, model, new)):
                    answered[i] = {"index": bench.index(i), "prediction": text}
            appender.write(list(answered.values()))
            results.update(answered)
            bar.update(len(answered))
    return results


# A TSV: the outputs

def write_outputs(bench: vlmeval.Bench, out: Path, predictions: dict[int, str],
                  skipped: dict[int, str], scored: vlmeval.Scored,
                  summary: dict) -> tuple[Path, Path]:
    """predictions.tsv (one line per row, in the file's order) and scores.json, each written
    atomically."""
    out.mkdir(parents=True, exist_ok=True)
    columns = ["index"] + [c for c in bench.columns if c not in ("index", "image")]
    extra = ["prediction", "extracted", "hit"]
    if bench.circular:
        extra.append("group_hit")
    if skipped:
        extra.append("skipped")
    pred_file = out / "predictions.tsv"
    tmp = out / f".predictions.tsv.{os.getpid()}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(columns + extra)
        for i, row in enumerate(bench.rows):
            values = [row[c] for c in columns]
            values.append(predictions.get(i, ""))
            values.append(scored.extracted.get(i, ""))
            values.append(_number(scored.hit.get(i)))
            if bench.circular:
                values.append(_number(scored.group_hit.get(i)))
            if skipped:
                values.append(skipped.get(i, ""))
            writer.writerow(values)
    tmp.replace(pred_file)
    scores_file = out / "scores.json"
    tmp = out / f".scores.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(scores_file)
    return pred_file, scores_file


def _number(value) -> str:
    if value is None:
        return ""
    return f"{value:g}"


def finish(bench: vlmeval.Bench, out: Path, predictions: dict[int, str],
           skipped: dict[int, str], skip_bad: bool, seconds: float) -> dict:
    """Score, write, print the table and the last JSON line; returns scores.json's content."""
    scored = vlmeval.score(bench, predictions)
    summary = dict(scored.report)
    if skip_bad:
        summary["skipped"] = len(skipped)
    pred_file, scores_file = write_outputs(bench, out, predictions, skipped, scored, summary)
    kinds = {"mcq": "multiple choice", "yorn": "yes/no", "vqa": "open VQA"}
    how = kinds[bench.kind]
    if bench.circular:
        how += ", circular"
    unit = "percent"
    if bench.kind == "mcq":
        unit = "fractions"
    if scored.scored:
        title = f"{bench.name} ({how}; {scored.scored} scored; {unit}):"
        print(vlmeval.table(scored.report, title))
    else:
        print(f"{bench.name}: no row with an answer (a TEST split?): predictions written, "
              "nothing scored")
    if skipped:
        print(f"skipped {len(skipped)} bad row(s), e.g. {next(iter(skipped.values()))}")
    last = {**summary, "rows": len(bench.rows), "scored": scored.scored,
            "seconds": round(seconds, 2), "predictions": str(pred_file),
            "scores": str(scores_file)}
    print(json.dumps(last, ensure_ascii=False))
    return summary


def run_tsv(args) -> None:
    d = dist.setup(timeout_s=args.dist_timeout)
    try:
        _run_tsv(d, args)
    finally:
        dist.teardown(d)


def _run_tsv(d: dist.Dist, args) -> None:
    t0 = time.time()
    bench = vlmeval.read_tsv(args.data, skip_bad=args.skip_bad)
    out = Path(args.out) if args.out else Path(args.model) / "eval" / bench.name
    args.max_new_tokens = args.max_new_tokens or vlmeval.MAX_NEW_TOKENS[bench.kind]
    # under torchrun each rank takes the device dist.setup gave it
    device = args.device
    if d.is_distributed:
        device = str(d.device)
    model, tok = load_for_inference(args.model, device)
    if d.rank == 0:
        run = {"data": str(Path(args.data).resolve()), "bytes": Path(args.data).stat().st_size,
               "model": str(Path(args.model).resolve()), "max_new_tokens": args.max_new_tokens}
        check_same_run(out, run)
        done = read_partial(out, bench)
    else:
        done = None
    # Every rank splits the same list of rows: what rank 0 found answered already, from its
    # reading.
    done = dist.all_gather_object(d, done, what="the rows already answered")[0]
    todo = [i for i in range(len(bench.rows)) if i not in done and i not in bench.bad]
    mine = todo[d.rank::d.world_size]
    if d.rank == 0 and done:
        print(f"{out}: {len(done)} row(s) answered by an earlier run; {len(todo)} to go")
    appender = Appender(out / PARTIAL / f"rank-{d.rank}.jsonl")
    try:
        results = answer_rows(model, tok, bench, mine, args, appender, show=d.rank == 0)
    finally:
        appender.close()
    everyone = dist.all_gather_object(d, results, what="the predictions of every rank")
    if d.rank != 0:
        return
    for part in everyone:
        done.update(part)
    predictions = {i: r["prediction"] for i, r in done.items() if "prediction" in r}
    skipped = {i: r["skipped"] for i, r in done.items() if "skipped" in r}
    skipped.update(bench.bad)
    finish(bench, out, predictions, skipped, args.skip_bad, time.time() - t0)


def score_only(args) -> None:
    """--predictions: score an existing predictions file against the TSV, no model."""
    t0 = time.time()
    bench = vlmeval.read_tsv(args.data, skip_bad=args.skip_bad, need_images=False)
    predictions = vlmeval.read_predictions(args.predictions, bench)
    out = Path(args.out) if args.out else Path(args.predictions).parent
    skipped = dict(bench.bad)
    for i in bench.bad:
        predictions.pop(i, None)
    missing = [i for i in range(len(bench.rows)) if i not in predictions and i not in skipped]
    if missing and not args.skip_bad:
        shown = ", ".join(bench.index(i) for i in missing[:10])
        if len(missing) > 10:
            shown += ", ..."
        raise LlavaMinError(f"{args.predictions}: no prediction for {len(missing)} row(s) of "
                            f"{args.data} (index {shown}); predict them, or pass --skip-bad to "
                            "score the rest")
    skipped.update({i: "no prediction" for i in missing})
    finish(bench, out, predictions, skipped, args.skip_bad, time.time() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model",
                   help="folder written by train.py / finetune.py (not needed with --predictions)")
    p.add_argument("--data", required=True,
                   help="test.json (list of {id, image, question, answer}) or a VLMEvalKit .tsv")
    p.add_argument("--image-folder", default=None,
                   help="test.json's images, or a TSV's image_path files")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default 16 for test.json; for a TSV VLMEvalKit's LLaVA-XTuner setting: "
                        "5 for multiple choice and yes/no, 512 for open questions")
    p.add_argument("--answers", default=None, help="test.json: per-sample JSONL output (default "
                                                   "MODEL/eval_answers.jsonl)")
    p.add_argument("--out", default=None,
                   help="TSV: output folder (default MODEL/eval/<file stem>/)")
    p.add_argument("--predictions", default=None,
                   help="TSV: score this predictions file (index, prediction), no model")
    p.add_argument("--skip-bad", action="store_true",
                   help="TSV: leave out bad rows (counted, printed and in scores.json) instead of "
                        "stopping at the first")
    p.add_argument("--num-workers", type=int, default=1,
                   help="TSV: loader processes that decode the images")
    p.add_argument("--dist-timeout", type=float, default=1800,
                   help="seconds any collective may wait")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, not {args.batch_size}")
    is_tsv = Path(args.data).suffix.lower() == ".tsv"
    if args.predictions is not None:
        if not is_tsv:
            p.error("--predictions scores a VLMEvalKit .tsv benchmark; --data is not one")
        score_only(args)
        return
    if args.model is None:
        p.error("--model is required (or --predictions, to score an existing predictions file)")
    if is_tsv:
        run_tsv(args)
    else:
        run_test_json(args)


if __name__ == "__main__":
    try:
        main()
    # bad input: the message says what and where, no traceback
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
