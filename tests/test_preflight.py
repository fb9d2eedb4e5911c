"""The user's mistakes, caught before any data is read or any model built (llava_min/preflight.py).

Proves: each wrong path (--data, --image-folder, --tokenizer, --llm, --vit, --projector,
--init-from, --eval-data) and each impossible flag combination gets its message (what, where, what
to do), exit status 2 and no traceback; a missing folder is said once; several mistakes are listed
together; the checks run before the data is read (a data file that is not JSON is never opened
when --llm is wrong); a mistyped flag is named with the real one; --help shows the defaults; stage
2 refuses a tokenizer whose bytes differ from stage 1's unless --new-tokenizer, and prints every
inherited setting it changes as "image_size 56 (stage 1: 28)".
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from llava_min import preflight
from test_train import run as run_checked, shapes, stage1_args  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@pytest.fixture(scope="module")
def stage1(shapes, tmp_path_factory):  # noqa: F811
    """A finished one-step stage-1 run (its args.json says image_size 28, max_length 64)."""
    out = tmp_path_factory.mktemp("s1") / "s1"
    run_checked([PY, *stage1_args(shapes, out, "--max-steps", 1, "--batch-size", 4)])
    return out


def usage_error(argv, capsys, stage=1) -> str:
    """train.py's parse_args and preflight.check on `argv`: asserts exit status 2, returns stderr."""
    with pytest.raises(SystemExit) as e:
        args = train.parse_args(stage, list(map(str, argv)))
        preflight.check(args, train.INHERITED)
    assert e.value.code == 2
    said = capsys.readouterr()
    assert "Traceback" not in said.err + said.out
    return said.err


def base(shapes, tmp_path, *extra):  # noqa: F811
    return ["--data", shapes / "pretrain.json", "--image-folder", shapes,
            "--tokenizer", shapes / "tok.model", "--llm-config", "tiny", "--vit-config", "tiny",
            "--image-size", 28, "--max-length", 64, "--out", tmp_path / "out", *extra]


def test_a_good_command_passes(shapes, tmp_path, capsys):  # noqa: F811
    args = train.parse_args(1, list(map(str, base(shapes, tmp_path))))
    preflight.check(args, train.INHERITED)
    assert capsys.readouterr().err == ""


def test_missing_paths_are_named_once_each(shapes, tmp_path, capsys):  # noqa: F811
    argv = base(shapes, tmp_path, "--image-folder", tmp_path / "no-images",
                "--data", tmp_path / "no.json", "--eval-data", tmp_path / "no-eval.json",
                "--tokenizer", tmp_path / "no.model")
    err = usage_error(argv, capsys)
    assert "4 errors in the command line (nothing was read or built)" in err
    assert err.count(f"--image-folder {tmp_path / 'no-images'}: the folder does not exist") == 1
    assert f"--data {tmp_path / 'no.json'}: the file does not exist" in err
    assert f"--eval-data {tmp_path / 'no-eval.json'}: the file does not exist" in err
    assert f"--tokenizer {tmp_path / 'no.model'}: the file does not exist" in err


def test_model_folders(shapes, tmp_path, capsys):  # noqa: F811
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--data", shapes / "pretrain.json", "--tokenizer", shapes / "tok.model",
            "--out", tmp_path / "out", "--llm-config", "nonsense", "--vit", empty,
            "--projector", tmp_path / "proj"]
    err = usage_error(argv, capsys)
    assert "--llm-config: nonsense: neither a InternLM2 preset" in err
    assert f"--vit: {empty}/config.json: no config.json here" in err
    assert f"--projector {tmp_path / 'proj'}: the folder does not exist" in err
    err = usage_error(base(shapes, tmp_path, "--llm", empty), capsys)
    assert f"--llm {empty} loads weights and --llm-config tiny builds fresh ones: give one" in err


def test_flag_combinations(shapes, tmp_path, capsys):  # noqa: F811
    cases = {("--fsdp", "--zero"): "--fsdp shards the optimizer state already",
             ("--lora-r", 4): "--lora-r 4 trains the LLM through adapters: add llm to --train",
             ("--pack", 32): "--pack 32 is shorter than --max-length 64",
             ("--eval-every", 5): "--eval-every needs --eval-data FILE",
             ("--image-size", 30): "--image-size 30 is not a multiple of the ViT patch size 14",
             ("--train", "lm"): "--train lm:",
             ("--batch-size", 0): "--batch-size 0: must be at least 1",
             ("--stop-grace", 0): "--stop-grace 0.0: must be more than 0",
             ("--new-tokenizer",): "--new-tokenizer allows a tokenizer other than the --init-from"}
    for flags, message in cases.items():
        assert message in usage_error(base(shapes, tmp_path, *flags), capsys), flags


def test_out_with_checkpoints_needs_resume(shapes, stage1, tmp_path, capsys):  # noqa: F811
    shutil.copytree(stage1, tmp_path / "out")
    err = usage_error(base(shapes, tmp_path), capsys)
    assert f"--out {tmp_path / 'out'} already holds checkpoints: pass --resume" in err
    args = train.parse_args(1, list(map(str, base(shapes, tmp_path, "--resume"))))
    preflight.check(args, train.INHERITED)


def test_init_from(shapes, stage1, tmp_path, capsys):  # noqa: F811
    data = ["--data", shapes / "finetune.json", "--image-folder", shapes, "--out", tmp_path / "s2"]
    err = usage_error([*data, "--init-from", tmp_path / "nonexist"], capsys, stage=2)
    assert err.count("the folder does not exist") == 1 and "inherited" not in err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(stage1 / "checkpoints", unfinished / "checkpoints")
    err = usage_error([*data, "--init-from", unfinished], capsys, stage=2)
    assert f"--init-from {unfinished}: a run that has not finished (its last checkpoint is " in err
    assert "finish it first with its command and --resume" in err


def test_another_tokenizer_is_refused_naming_both(shapes, stage1, tmp_path, capsys):  # noqa: F811
    other = tmp_path / "other.model"
    run_checked([PY, "-m", "llava_min.tokenizer", "train", "--data", shapes / "finetune.json",
                 "--vocab-size", "380", "--out", other])
    argv = ["--init-from", stage1, "--data", shapes / "finetune.json", "--image-folder", shapes,
            "--out", tmp_path / "s2", "--tokenizer", other]
    err = usage_error(argv, capsys, stage=2)
    stage1_tok = stage1 / "tokenizer.model"
    assert f"--tokenizer {other} is not the tokenizer stage 1 trained with ({stage1_tok}" in err
    assert "add --new-tokenizer if a new one is meant" in err
    # The same bytes under another name are the same tokenizer.
    copy = tmp_path / "copy.model"
    shutil.copyfile(stage1 / "tokenizer.model", copy)
    preflight.check(train.parse_args(2, list(map(str, argv[:-1] + [copy]))), train.INHERITED)

    # Through finetune.py: --new-tokenizer lets it run, and the report names what differs
    # from stage 1.
    p = run_checked([PY, "finetune.py", *map(str, argv), "--new-tokenizer", "--image-size", "56",
                     "--max-steps", "1", "--batch-size", "4", "--num-workers", "0"])
    assert "changed from stage 1: " in p.stdout
    line = next(x for x in p.stdout.splitlines() if x.startswith("changed from stage 1: "))
    assert "image_size 56 (stage 1: 28)" in line
    assert f"tokenizer {other} (stage 1: {stage1_tok}; --new-tokenizer)" in line
    assert "max_length" not in line                     # inherited unchanged: not listed


def test_the_check_comes_before_the_data_is_read(shapes, tmp_path):  # noqa: F811
    """A data file that is not JSON: were it read first, its error would come first."""
    garbage = tmp_path / "data.json"
    garbage.write_bytes(b"\x00 not json" * 1000)
    cmd = [PY, "train.py", "--data", garbage, "--image-folder", shapes,
           "--tokenizer", shapes / "tok.model", "--llm", tmp_path / "no-llm", "--vit-config", "tiny",
           "--out", tmp_path / "out"]
    t0 = time.monotonic()
    p = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds = time.monotonic() - t0
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        "train.py: error in the command line (nothing was read or built):",
        f"  --llm {tmp_path / 'no-llm'}: the folder does not exist (a typo, or a path relative "
        f"to another folder: this one is relative to {ROOT})"]
    assert not (tmp_path / "out").exists()             # nothing written either
    assert seconds < 30, seconds            # the import of torch, not a pass over the data


def test_a_mistyped_flag_is_named(capsys):
    for typed, meant in (("--output-dir", "--out"), ("--image_folder", "--image-folder"),
                         ("--save-evry", "--save-every"), ("--lora-rank=4", "--lora-r")):
        with pytest.raises(SystemExit) as e:
            train.parse_args(1, ["--data", "x.json", "--out", "o", *typed.split("=")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"unknown flag {typed.split('=')[0]}; did you mean {meant}?" in err, err
        assert "usage:" not in err and "--help` lists every flag" in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(1, ["--help"])
    raw = capsys.readouterr().out
    text = " ".join(raw.split())                          # argparse wraps the flags' lines
    assert "checkpoint every N optimizer steps (default: 500)" in text
    assert "--seed SEED default: 0" in text
    assert "--lr LR peak learning rate (warm-up then cosine) (default: 0.001)" in text
    assert "--stop-grace STOP_GRACE" in text and "(default: 30)" in text
    # The docstring, kept as written.
    assert train.__doc__.splitlines()[3] in raw.splitlines()
