"""Optimisation proves: parameter groups put norms, biases and 1-D tensors outside weight decay, leave
frozen parts out and give the projector its own learning rate; the schedule matches torch's own
LinearLR(start 1e-5) + CosineAnnealingLR chain (XTuner's schedule) at every step, with the right warm-up start,
peak and end; the scheduler's state is the step, so stopping, saving and resuming gives bit-identical
weights; clipping returns the pre-clip norm and clips to the limit; and ZeRO-sharded AdamW on two gloo
processes takes the same steps as plain AdamW and saves a state that a single process can load.
"""
import io
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from llava_min import LlavaMinError
from llava_min.optim import (CosineSchedule, clip_gradients, gather_optimizer_state, lr_at, make_optimizer,
                             param_groups)


class TinyVLM(nn.Module):
    """Names as in LLaVA: vit.*, projector.model.{0,2}.*, llm.* (with norms)."""

    def __init__(self):
        super().__init__()
        self.vit = nn.Linear(6, 4)
        self.projector = nn.Module()
        self.projector.model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8))
        self.llm = nn.Module()
        self.llm.wqkv = nn.Linear(8, 8, bias=False)
        self.llm.attention_norm = nn.RMSNorm(8)
        self.llm.w1 = nn.Linear(8, 8, bias=True)
        self.vit.requires_grad_(False)

    def forward(self, x):
        h = self.projector.model(self.vit(x))
        return self.llm.w1(self.llm.attention_norm(self.llm.wqkv(h)))


def names_of(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_param_groups_split_decay_and_projector():
    model = TinyVLM()
    groups = param_groups(model, lr=2e-5, weight_decay=0.1, projector_lr=1e-3)
    got = {g["name"]: (names_of(model, g), g["lr"], g["weight_decay"]) for g in groups}
    assert got == {
        "model/decay": (["llm.w1.weight", "llm.wqkv.weight"], 2e-5, 0.1),
        "model/no_decay": (["llm.attention_norm.weight", "llm.w1.bias"], 2e-5, 0.0),
        "projector/decay": (["projector.model.0.weight", "projector.model.2.weight"], 1e-3, 0.1),
        "projector/no_decay": (["projector.model.0.bias", "projector.model.2.bias"], 1e-3, 0.0),
    }
    # Without a projector rate the projector joins the model's groups; frozen vit.* is never included.
    groups = param_groups(model, lr=1e-3, weight_decay=0.0)
    assert [g["name"] for g in groups] == ["model/decay", "model/no_decay"]
    assert sum(len(g["params"]) for g in groups) == 8
    model.requires_grad_(False)
    with pytest.raises(LlavaMinError, match="no trainable parameter"):
        param_groups(model, lr=1e-3, weight_decay=0.0)


def test_make_optimizer_on_cpu_is_foreach_adamw():
    model = TinyVLM()
    opt = make_optimizer(param_groups(model, lr=1e-3, weight_decay=0.0), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["foreach"] is True and opt.defaults["fused"] is False
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    # zero=True in a single process: nothing to shard, plain AdamW
    assert isinstance(make_optimizer(model.parameters(), lr=1e-3, zero=True), torch.optim.AdamW)


def test_lr_schedule_values():
    peak, n = 1e-3, 1000  # warm-up: ceil(0.03 * 1000) = 30 steps
    assert lr_at(0, n, peak) == pytest.approx(peak * 1e-5)
    assert lr_at(15, n, peak) == pytest.approx(peak * (1e-5 + (1 - 1e-5) * 0.5))
    assert lr_at(30, n, peak) == peak
    assert lr_at(30 + 485, n, peak) == pytest.approx(peak / 2)  # cosine half-way
    assert 0 < lr_at(n - 1, n, peak) < 1e-8 and lr_at(n, n, peak) == 0.0 and lr_at(n + 5, n, peak) == 0.0
    assert lr_at(n, n, peak, min_ratio=0.1) == pytest.approx(peak * 0.1)
    assert lr_at(0, 10, peak, warmup_ratio=0.0) == peak
    assert lr_at(0, 10, peak) == pytest.approx(peak * 1e-5)  # ceil: a short run still warms up one step
    after = [lr_at(s, n, peak) for s in range(30, n + 1)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    with pytest.raises(LlavaMinError, match="max_steps must be >= 1"):
        lr_at(0, 0, peak)


def test_lr_schedule_matches_torch_linear_then_cosine():
    """XTuner's schedule is mmengine LinearLR(start_factor=1e-5) then CosineAnnealingLR(eta_min=0); torch's
    own schedulers of the same names compute the same sequence."""
    n, warmup, peak = 200, 6, 2e-4
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak)
    ref = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-5, end_factor=1.0, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n - warmup, eta_min=0.0)], milestones=[warmup])
    for step in range(n):
        assert lr_at(step, n, peak) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6, abs=1e-15), step
        opt.step()
        ref.step()


def train(model, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=g)
        model(x).square().mean().backward()
        clip_gradients(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()


def fresh(seed=0):
    torch.manual_seed(seed)
    model = TinyVLM()
    opt = make_optimizer(param_groups(model, lr=1e-2, weight_decay=0.1, projector_lr=3e-2), lr=1e-2)
    return model, opt, CosineSchedule(opt, max_steps=20, warmup_ratio=0.2)


def test_scheduler_sets_every_groups_rate_and_resumes_exactly():
    model, opt, sched = fresh()
    assert [g["lr"] for g in opt.param_groups] == [lr_at(0, 20, 1e-2, 0.2)] * 2 + [lr_at(0, 20, 3e-2, 0.2)] * 2
    train(model, opt, sched, 6, seed=1)
    assert sched.state_dict() == {"step": 6}
    assert sched.lr == lr_at(6, 20, 1e-2, 0.2) and opt.param_groups[2]["lr"] == lr_at(6, 20, 3e-2, 0.2)
    train(model, opt, sched, 6, seed=2)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    # The same run, stopped after 6 steps, saved, and resumed in new objects.
    model, opt, sched = fresh()
    train(model, opt, sched, 6, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, opt, sched = fresh(seed=99)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert sched.lr == lr_at(6, 20, 1e-2, 0.2)
    train(model, opt, sched, 6, seed=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_clip_gradients_returns_the_norm_before_clipping():
    a, b, c = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # c has no gradient
    assert clip_gradients([a, b, c], None) == pytest.approx(5.0)
    assert torch.equal(a.grad, torch.tensor([3.0, 0.0]))  # measuring only
    assert clip_gradients([a, b, c], 1.0) == pytest.approx(5.0)
    assert math.hypot(*a.grad, *b.grad) == pytest.approx(1.0, rel=1e-5)
    assert clip_gradients([c], 1.0) == 0.0
    b.grad = torch.tensor([float("nan")])
    assert math.isnan(clip_gradients([a, b], 1.0))


# --------------------------------------------------------------------------------------------------
# ZeRO on two gloo processes

def _zero_worker(rank, world, port, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TinyVLM()
        opt = make_optimizer(param_groups(model, lr=1e-2, weight_decay=0.1, projector_lr=3e-2), lr=1e-2, zero=True)
        assert type(opt).__name__ == "ZeroRedundancyOptimizer"
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            model(torch.randn(4, 6, generator=g)).square().mean().backward()  # same batch on both ranks
            opt.step()
            opt.zero_grad(set_to_none=True)
        state = gather_optimizer_state(opt)  # collective
        if rank == 0:
            torch.save({"model": model.state_dict(), "opt": state}, result_file)
        else:
            assert state is None
    finally:
        dist.destroy_process_group()


def test_zero_sharded_adamw_matches_plain_adamw(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_zero_worker, args=(2, port, str(tmp_path / "zero.pt")), nprocs=2, join=True,
                       start_method="fork")
    got = torch.load(tmp_path / "zero.pt", weights_only=True)

    torch.manual_seed(0)
    model = TinyVLM()
    opt = make_optimizer(param_groups(model, lr=1e-2, weight_decay=0.1, projector_lr=3e-2), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        model(torch.randn(4, 6, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["model"][k], v, rtol=0, atol=1e-7, msg=k)
    # The gathered state is a whole AdamW state: it loads into a single-process optimizer.
    single = make_optimizer(param_groups(model, lr=1e-2, weight_decay=0.1, projector_lr=3e-2), lr=1e-2)
    single.load_state_dict(got["opt"])
    for p_ref, p in zip(opt.state.values(), single.state.values()):
        torch.testing.assert_close(p["exp_avg_sq"], p_ref["exp_avg_sq"], rtol=0, atol=1e-9)
        assert float(p["step"]) == 3
