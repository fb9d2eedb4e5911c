"""The optimizer step as train.py takes it, through llava_min.parallel in one process (the several-process
layouts run end to end in test_train.py, test_fsdp.py and test_faults.py). Proves: a finite step changes the
weights and the schedule; a non-finite gradient norm with a finite loss never reaches the weights or the AdamW
moments (--nan skip drops the gradients, --nan stop raises naming the step and the samples); a non-finite
loss likewise; a skipped step still moves the learning-rate schedule, so step N uses the rate of step N."""
import argparse
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402
from llava_min import dist, parallel  # noqa: E402
from llava_min.optim import CosineSchedule, lr_at  # noqa: E402

MAX_STEPS = 10


def setup(nan: str = "skip"):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    d = dist.Dist()
    par = parallel.Parallel(model, d)
    optimizer = par.make_optimizer([{"params": list(model.parameters()), "lr": 0.1}], lr=0.1)
    schedule = CosineSchedule(optimizer, MAX_STEPS, warmup_ratio=0.0)
    args = argparse.Namespace(clip=1.0, nan=nan)
    return model, d, par, schedule, args


def backward(model, poison: float | None = None):
    model(torch.ones(4, 3)).square().sum().backward()
    if poison is not None:
        model.weight.grad[0, 0] = poison


MICRO = [{"ids": ["sample-a", "sample-b"]}]


def test_one_process_is_the_single_layout():
    model, d, par, _, _ = setup()
    assert par.mode == "single" and par.module is model and not par.sharded


def test_finite_step_changes_the_weights_and_the_schedule():
    model, d, par, schedule, args = setup()
    before = model.weight.detach().clone()
    backward(model)
    norm = train.optimizer_step(par, schedule, args, 1.0, MICRO, 0, d)
    assert norm is not None and math.isfinite(norm) and norm > 0
    assert not torch.equal(model.weight, before)
    assert model.weight.grad is None
    assert schedule.step_count == 1


@pytest.mark.parametrize("poison", [math.inf, math.nan])
def test_non_finite_gradient_norm_is_skipped_not_stepped(poison, capsys):
    model, d, par, schedule, args = setup("skip")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    backward(model, poison)
    assert train.optimizer_step(par, schedule, args, 1.0, MICRO, 4, d) is None
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None, n
    # No AdamW moment was touched: the next finite step starts from a clean state.
    assert not par.optimizer.state
    log = capsys.readouterr().out
    assert "step 5: the gradient norm is" in log and "with a finite loss 1" in log
    assert "['sample-a', 'sample-b']" in log and "-- skipping this step" in log


def test_non_finite_gradient_norm_stops_with_nan_stop():
    model, d, par, schedule, args = setup("stop")
    before = model.weight.detach().clone()
    backward(model, math.inf)
    with pytest.raises(FloatingPointError, match=r"step 3: the gradient norm is inf .*sample-a.*--nan skip"):
        train.optimizer_step(par, schedule, args, 2.5, MICRO, 2, d)
    assert torch.equal(model.weight, before)


def test_non_finite_loss_is_skipped_not_stepped():
    model, d, par, schedule, args = setup("skip")
    before = model.weight.detach().clone()
    backward(model)
    assert train.optimizer_step(par, schedule, args, math.nan, MICRO, 0, d) is None
    assert torch.equal(model.weight, before) and model.weight.grad is None


def test_skipped_steps_keep_the_schedule_in_step():
    model, d, par, schedule, args = setup("skip")
    for step in range(4):
        backward(model, math.inf if step in (1, 2) else None)
        train.optimizer_step(par, schedule, args, 1.0, MICRO, step, d)
        # The rate the next step uses is that of its own number, skipped steps counted.
        assert schedule.lr == pytest.approx(lr_at(step + 1, MAX_STEPS, 0.1, 0.0)), step
    assert schedule.step_count == 4
