"""Distributed set-up: one process or `torchrun`, rank-aware printing, collectives that name themselves.

    d = dist.setup(timeout_s=args.dist_timeout)     # torchrun's environment, or one process
    hang.attach(d, out)                             # optional: heartbeats, stacks (tools/hang.py)
    dist.all_reduce(d, loss_sum, what=f"loss sum at step {step}")
    with dist.collective(d, f"DDP gradient all-reduce at step {step}"):
        loss.backward()                             # DDP's own collectives, named the same way
    dist.teardown(d)

NCCL on the rank's GPU when CUDA is available, else gloo. `--dist-timeout` bounds every collective; a
failed or timed-out one raises DistTimeout.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from . import LlavaMinError


class DistTimeout(RuntimeError):
    """A collective timed out or a peer failed during it; the message names it, the step and
    where ranks were."""


@dataclass
class Dist:
    """This process's place in the job. One process: rank 0 of 1, no process group."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None        # "nccl" or "gloo"; None without a process group
    timeout_s: float = 600.0
    cpu_group: object = None          # gloo group for object collectives
    store: object = None              # torchrun's key-value store (TCPStore), for barriers
    barriers: int = 0                 # barriers passed so far: names each one's keys in the store
    # Where this rank is, for error messages (and the hang tool's heartbeats).
    step: int = 0
    phase: str = "start"
    forensics: object = None          # tools.hang.Forensics once attached: beat / report / close
    failed: bool = False              # a collective failed: the group may be wedged, teardown leaves it

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    def print0(self, *args, **kwargs) -> None:
        if self.rank == 0:
            print(*args, **kwargs, flush=True)

    def log(self, msg: str) -> None:
        """print on every rank, each line prefixed "[rank N]" when there is more than one."""
        prefix = ""
        if self.world_size > 1:
            prefix = f"[rank {self.rank}] "
        print("\n".join(prefix + line for line in str(msg).splitlines() or [""]), flush=True)

    def heartbeat(self, step: int | None = None, phase: str | None = None) -> None:
        """Record where this rank is; cheap enough for every step (the hang tool writes at most
        once a second)."""
        if step is not None:
            self.step = step
        if phase is not None:
            self.phase = phase
        if self.forensics is not None:
            self.forensics.beat(self.step, self.phase)


def setup(timeout_s: float = 600.0) -> Dist:
    """Join the job torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...), or return a
    one-process Dist."""
    env = os.environ
    # Less fragmentation on long runs (the allocator reads it at the first CUDA allocation, after
    # this). Only a default: an exported value wins.
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if "RANK" not in env or "WORLD_SIZE" not in env:
        device = torch.device("cpu")
        if torch.cuda.is_available():
            device = torch.device("cuda", 0)
        return Dist(device=device, timeout_s=timeout_s)
    rank = int(env["RANK"])
    world_size = int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", 0))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise LlavaMinError(f"rank {rank}: RANK and WORLD_SIZE are set but {', '.join(missing)} is not; "
                            "start the job with torchrun (which sets all of them) or unset RANK for one "
                            "process")
    if not 0 <= rank < world_size:
        raise LlavaMinError(f"RANK {rank} is not in [0, WORLD_SIZE={world_size}); start the job with "
                            "torchrun")
    backend = "gloo"
    device = torch.device("cpu")
    if torch.cuda.is_available():
        backend = "nccl"
        # Raise in the waiting thread instead of hanging (where the collective can be named), and
        # tear the process down for errors nobody waits on. Only defaults: an exported value wins.
        # Before CUDA starts.
        env.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        if local_rank >= torch.cuda.device_count():
            visible = env.get("CUDA_VISIBLE_DEVICES", "unset")
            raise LlavaMinError(f"rank {rank}: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                                f"GPU(s) are visible (CUDA_VISIBLE_DEVICES={visible}); --nproc_per_node "
                                "must not exceed the GPUs of a node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    d = Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
             backend=backend, timeout_s=timeout_s, phase="init_process_group")
    _join(d, env)
    d.heartbeat(0, "started")
    return d


def _join(d: Dist, env) -> None:
    """init_process_group, the gloo group for object collectives and the store for barriers."""
    timeout = datetime.timedelta(seconds=d.timeout_s)
    start = time.monotonic()
    try:
        if d.backend == "nccl":
            tdist.init_process_group("nccl", timeout=timeout, device_id=d.device)
            d.cpu_group = tdist.new_group(backend="gloo", timeout=timeout)
        else:
            tdist.init_process_group("gloo", timeout=timeout)
            d.cpu_group = tdist.group.WORLD
        d.store = tdist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                                 timeout=timeout)
    except RuntimeError as e:
        _fail(d, "init_process_group", f"joining the job of {d.world_size} processes",
              time.monotonic() - start, d.timeout_s, e)


def teardown(d: Dist) -> None:
    """Record how this rank ended, stop the hang tool, leave the process group. Call it in a
    `finally`."""
    error = sys.exc_info()[1]
    phase = "exited"
    if error:
        phase = f"exited: {type(error).__name__}: {str(error)[:200]}"
    d.heartbeat(phase=phase)
    if d.forensics is not None:
        d.forensics.close()
    # After a failed collective the group may be wedged (NCCL can block in destroy), and the
    # process is exiting.
    if d.is_distributed and tdist.is_initialized() and not d.failed:
        tdist.destroy_process_group()


@contextmanager
def collective(d: Dist, what: str, kind: str = "collective", timeout_s: float | None = None,
               any_error: bool = False):
    """A failure of a collective inside the block (e.g. DDP's backward) becomes a DistTimeout
    naming `what` and the step; other errors pass through, unless `any_error` (the block is
    nothing but a collective)."""
    d.heartbeat(phase=f"in {kind} '{what}'")
    start = time.monotonic()
    try:
        yield
    except DistTimeout:
        raise                                   # already named by an inner collective
    except RuntimeError as e:
        # NCCL, the store and the network raise DistError; gloo a plain RuntimeError whose message
        # opens with gloo's source file ("[.../gloo/transport/tcp/pair.cc:553] Connection closed by
        # peer").
        from_gloo = "/gloo/" in str(e).split("]", 1)[0]
        if not (any_error or isinstance(e, tdist.DistError) or from_gloo):
            raise
        _fail(d, kind, what, time.monotonic() - start, timeout_s or d.timeout_s, e)
    d.heartbeat(phase=f"after {kind} '{what}'")


def all_reduce(d: Dist, tensor: torch.Tensor, op=tdist.ReduceOp.SUM,
               what: str = "all_reduce") -> torch.Tensor:
    """In-place all-reduce on the default group, waited on with the timeout. One process:
    returns tensor."""
    if not d.is_distributed:
        return tensor
    with collective(d, what, "all_reduce", any_error=True):
        work = tdist.all_reduce(tensor, op=op, async_op=True)
        work.wait(timeout=datetime.timedelta(seconds=d.timeout_s))
    return tensor


def barrier(d: Dist, what: str = "barrier", timeout_s: float | None = None) -> None:
    """Every rank waits for every other, up to timeout_s (default --dist-timeout; longer while
    rank 0 saves). A counter in torchrun's store, since a group's operations end at its timeout;
    a timeout names who never came."""
    if not d.is_distributed:
        return
    timeout_s = timeout_s or d.timeout_s
    d.barriers += 1
    # The same on every rank: barriers come in the same order.
    key = f"llava-min/barrier-{d.barriers}"
    with collective(d, what, "barrier", timeout_s, any_error=True):
        d.store.set(f"{key}/rank-{d.rank}", "")
        if d.store.add(key, 1) == d.world_size:
            d.store.set(f"{key}/all", "")        # the last rank to arrive opens the gate
        try:
            d.store.wait([f"{key}/all"], datetime.timedelta(seconds=timeout_s))
        except tdist.DistStoreError:
            came = [d.store.check([f"{key}/rank-{r}"]) for r in range(d.world_size)]
            missing = [str(r) for r in range(d.world_size) if not came[r]]
            raise tdist.DistStoreError(f"rank(s) {', '.join(missing)} did not reach this barrier within "
                                       f"{timeout_s:g} s") from None


def all_gather_object(d: Dist, obj, what: str = "all_gather_object") -> list:
    """[obj of rank 0, obj of rank 1, ...] over the gloo group."""
    if not d.is_distributed:
        return [obj]
    out = [None] * d.world_size
    with collective(d, what, "all_gather_object", any_error=True):
        tdist.all_gather_object(out, obj, group=d.cpu_group)
    return out


def _fail(d: Dist, kind: str, what: str, elapsed: float, timeout_s: float, error: BaseException):
    """Raise DistTimeout with the whole picture (the hang tool, if attached, adds every rank's
    whereabouts)."""
    d.failed = True
    # Backends word their timeouts differently ("Timed out waiting 4000ms", "Operation timed out!",
    # a NCCL watchdog): the time spent in the collective is what tells.
    timed_out = elapsed >= 0.9 * timeout_s
    outcome = "failed"
    if timed_out:
        outcome = "timed out"
    d.heartbeat(phase=f"in {kind} '{what}'")
    if d.forensics is not None:
        ranks = d.forensics.report(f"in {kind} '{what}'", f"rank {d.rank}: {kind} '{what}' {outcome}")
    else:
        ranks = (f"  rank {d.rank}: step {d.step}, {d.phase} (other ranks unknown: attach "
                 "llava_min.tools.hang for heartbeats and stacks)")
    text = type(error).__name__
    if str(error).strip():
        text = str(error).strip().splitlines()[0][:300]
    where = f"rank {d.rank}: {kind} '{what}' at step {d.step}"
    if timed_out:
        wait = ""
        if timeout_s != d.timeout_s:
            wait = f", this wait {timeout_s:g} s"
        head = (f"{where} timed out after {elapsed:.0f} s (--dist-timeout {d.timeout_s:g} s{wait}). "
                f"Backend said: {text}")
        advice = ("A rank stuck elsewhere (data loading, a long first step, a hang) or stopped makes every "
                  "other rank wait here: its heartbeat and stack show where. If it is only slow, raise "
                  "--dist-timeout.")
    else:
        head = f"{where} failed after {elapsed:.1f} s: {text}"
        advice = ("Another rank probably exited or crashed: look for its error above (its heartbeat says "
                  "how).")
    raise DistTimeout(f"{head}\nRanks last seen:\n{ranks}\n{advice}") from error


def config_hash(obj) -> str:
    """A short, order-independent hash of a JSON-able configuration (paths and numbers as
    written)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_consistent(d: Dist, fields: dict) -> None:
    """A collective: all ranks compare `fields` (data size, config hash, ...); a difference
    raises LlavaMinError on every rank, naming the field and which rank has which value."""
    # Plain values compare as they are; anything else by its text.
    mine = {}
    for k, v in fields.items():
        if not isinstance(v, (int, float, str, bool, type(None))):
            v = str(v)
        mine[k] = v
    everyone = all_gather_object(d, mine, what="start-up consistency check")
    problems = []
    for key in dict.fromkeys(k for ranks in everyone for k in ranks):
        values = [repr(ranks.get(key, "<missing>")) for ranks in everyone]
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if not odd:
            continue
        # Which ranks hold which value: "rank 0: 48; ranks 1, 2: 47".
        groups = []
        for v in dict.fromkeys(values):
            holders = [str(r) for r, w in enumerate(values) if w == v]
            plural = ""
            if len(holders) > 1:
                plural = "s"
            groups.append(f"rank{plural} {', '.join(holders)}: {v}")
        odd_ranks = ", ".join(map(str, odd))
        problems.append(f"'{key}' differs on rank(s) {odd_ranks} from rank 0 ({'; '.join(groups)})")
    if problems:
        raise LlavaMinError(f"rank {d.rank}: the ranks disagree at start-up:\n  " + "\n  ".join(problems)
                            + "\nEvery rank must read the same data files and arguments (same checkout, "
                            "same paths on every node); fix the differing rank's environment.")
