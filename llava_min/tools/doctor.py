"""Environment and collective checks, before a long run finds the problem for you.

    python -m llava_min.doctor                          # this machine, one process
    torchrun --nproc_per_node 4 -m llava_min.doctor     # also: every rank joins, all-reduce works, bandwidth

One line per check (`ok`, `info`, `WARN`, `FAIL`), exit code 1 if anything failed. train.py calls `quick_check`
at start-up under torchrun (well under a second).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .. import LlavaMinError, dist
from . import memory

GiB = 2**30
MIN_SHM_BYTES = 10**9          # 1 GB
MIN_OPEN_FILES = 4096
ECHOED_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "GLOO_")
ECHOED_NAMES = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "OMP_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF")


@dataclass
class Check:
    status: str      # "ok", "info", "warn" or "fail"
    name: str
    detail: str

    def line(self) -> str:
        status = self.status.upper() if self.status in ("warn", "fail") else self.status   # problems shout
        return f"{status:4s}  {self.name:12s} {self.detail}"


# Checks that need no other rank

def version_checks() -> list[Check]:
    checks = [Check("info", "versions", f"Python {platform.python_version()}, torch {torch.__version__}, "
                    f"CUDA {torch.version.cuda or 'none (CPU build)'}, gloo "
                    f"{'yes' if tdist.is_available() and tdist.is_gloo_available() else 'NO'}")]
    if torch.cuda.is_available() and tdist.is_nccl_available():
        checks.append(Check("info", "versions", "NCCL " + ".".join(map(str, torch.cuda.nccl.version()))))
    return checks


def gpu_checks(all_devices: bool = True) -> list[Check]:
    """Each GPU (memory, compute capability, bf16) and the peer-to-peer matrix. all_devices False: only this
    rank's GPU (each device queried costs a CUDA context of a few hundred MB)."""
    if not torch.cuda.is_available():
        return [Check("info", "gpus", "no CUDA device visible: training runs on the CPU with gloo")]
    n, checks = torch.cuda.device_count(), []
    for i in range(n) if all_devices else [torch.cuda.current_device()]:
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        bf16 = "bf16" if p.major >= 8 else "no bf16 (use --dtype float32)"
        checks.append(Check("info", "gpus", f"cuda:{i} {p.name}, {total / GiB:.1f} GiB ({free / GiB:.1f} free), "
                            f"compute {p.major}.{p.minor}, {bf16}"))
        if free < 0.9 * total - GiB:
            checks.append(Check("warn", "gpus", f"cuda:{i}: {(total - free) / GiB:.1f} GiB already in use by "
                                "other processes (nvidia-smi shows which)"))
    if all_devices and n > 1:
        peer = [[i == j or torch.cuda.can_device_access_peer(i, j) for j in range(n)] for i in range(n)]
        rows = [f"cuda:{i}" + "".join("  -" if j == i else "  y" if peer[i][j] else "  n" for j in range(n))
                for i in range(n)]
        missing = [(i, j) for i in range(n) for j in range(n) if not peer[i][j]]
        checks.append(Check("info", "gpus", "peer-to-peer access (row -> column):\n" +
                            "\n".join(" " * 19 + r for r in rows)))
        if missing:
            checks.append(Check("warn", "gpus", f"no peer-to-peer access for {len(missing)} GPU pair(s), e.g. "
                                f"cuda:{missing[0][0]} -> cuda:{missing[0][1]}: NCCL goes through host memory "
                                "(slower); check NCCL_P2P_DISABLE, and IOMMU / ACS settings on VMs"))
    return checks


def host_checks() -> list[Check]:
    """RAM, /dev/shm (loader workers and NCCL need it; containers default to 64 MB), the open-file limit."""
    total, available = memory.host_ram()
    ram = f"{total / GiB:.1f} GiB RAM ({available / GiB:.1f} GiB available)" if total else "RAM unknown"
    checks = [Check("info", "host", f"{socket.gethostname()}, {os.cpu_count()} CPUs, {ram}")]
    try:
        st = os.statvfs("/dev/shm")
        size, free = st.f_frsize * st.f_blocks, st.f_frsize * st.f_bavail
        if size < MIN_SHM_BYTES:
            checks.append(Check("warn", "host", f"/dev/shm is {size / 2**20:.0f} MB ({free / 2**20:.0f} MB free), "
                                "below 1 GB: loader workers and NCCL fail with bus errors or hangs. Docker: "
                                "--shm-size=16g (or --ipc=host); Kubernetes: an emptyDir with medium Memory"))
        else:
            checks.append(Check("ok", "host", f"/dev/shm {size / GiB:.1f} GiB ({free / GiB:.1f} GiB free)"))
    except OSError:
        checks.append(Check("warn", "host", "/dev/shm is missing: loader workers cannot share tensors"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    advice = (f": below {MIN_OPEN_FILES}, loader workers run out of file descriptors ('Too many open files'); "
              "raise it with ulimit -n 65536") if soft < MIN_OPEN_FILES else ""
    checks.append(Check("warn" if advice else "ok", "host", f"open-file limit {soft} (hard {hard}){advice}"))
    return checks


def environment_checks() -> list[Check]:
    """Every NCCL_*, TORCH_NCCL_*, CUDA_VISIBLE_DEVICES, torchrun and allocator variable; flags hang makers."""
    env = os.environ
    names = sorted(k for k in env if k.startswith(ECHOED_PREFIXES)) + [k for k in ECHOED_NAMES if k in env]
    checks = [Check("info", "environment", f"{k}={env[k]}") for k in dict.fromkeys(names)]
    if not names:
        checks.append(Check("info", "environment", "no NCCL_* / TORCH_NCCL_* / CUDA_VISIBLE_DEVICES settings"))
    stuck = "a stuck NCCL collective hangs instead of raising after --dist-timeout; unset it"
    for key, value, why in (("TORCH_NCCL_BLOCKING_WAIT", "0", stuck), ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0", stuck),
                            ("NCCL_P2P_DISABLE", "1", "GPU-to-GPU traffic goes through host memory")):
        if env.get(key) == value:
            checks.append(Check("warn", "environment", f"{key}={value}: {why}"))
    if torch.cuda.is_available() and "NCCL_DEBUG" not in env:
        checks.append(Check("info", "environment", "NCCL_DEBUG=WARN makes NCCL print the cause of its own errors"))
    return checks


def rank_checks() -> list[Check]:
    """torchrun's variables against each other and against the visible GPUs (before joining anything)."""
    env = os.environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        return [Check("info", "ranks", "one process (run under torchrun --nproc_per_node N to check collectives)")]
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local, local_world = int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1))
    except (KeyError, ValueError) as e:
        return [Check("fail", "ranks", f"torchrun's variables are incomplete or not numbers ({e}): RANK and "
                      "WORLD_SIZE must both be set (torchrun does this); unset them for one process")]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else None
    problems = [message for wrong, message in [
        (not 0 <= rank < world, f"RANK {rank} is not below WORLD_SIZE {world}"),
        (not 0 <= local < local_world, f"LOCAL_RANK {local} is not below LOCAL_WORLD_SIZE {local_world}"),
        (local_world > world, f"LOCAL_WORLD_SIZE {local_world} exceeds WORLD_SIZE {world}"),
        ("MASTER_ADDR" not in env, "MASTER_ADDR is not set"),
        ("MASTER_PORT" not in env, "MASTER_PORT is not set"),
        (gpus is not None and local_world > gpus, f"{local_world} processes per node but {gpus} GPU(s) visible "
         f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}): two ranks would share a GPU; "
         "--nproc_per_node must not exceed the GPUs")] if wrong]
    if problems:
        return [Check("fail", "ranks", f"rank {env.get('RANK')}: " + "; ".join(problems))]
    return [Check("ok", "ranks", f"rank {rank} of {world}, local rank {local} of {local_world}")]


# Checks across ranks

def quick_check(d: dist.Dist) -> list[str]:
    """Under torchrun: every rank joins (a timeout names the missing ones), no two share a GPU, versions agree, an
    all-reduce sums right. Raises LlavaMinError or dist.DistTimeout; returns the warnings it printed."""
    if not d.is_distributed:
        return []
    dist.barrier(d, what="start-up barrier (every rank has joined)")
    facts = {"host": socket.gethostname(), "device": str(d.device),
             "gpu": torch.cuda.get_device_properties(d.device).uuid.hex if d.device.type == "cuda" else None,
             "torch": torch.__version__, "cuda": torch.version.cuda}
    everyone = dist.all_gather_object(d, facts, what="start-up fact sheets")
    problems, seen = [], {}
    for rank, f in enumerate(everyone):
        first = seen.setdefault((f["host"], f["gpu"]), rank)
        if f["gpu"] is not None and first != rank:
            problems.append(f"ranks {first} and {rank} share one GPU ({f['device']} on {f['host']}); check "
                            "CUDA_VISIBLE_DEVICES and --nproc_per_node")
    for field in ("torch", "cuda"):
        if len({f[field] for f in everyone}) > 1:
            problems.append(f"{field} versions differ across ranks: " +
                            ", ".join(f"rank {r}: {f[field]}" for r, f in enumerate(everyone)))
    t = torch.tensor([float(d.rank + 1)], device=d.device)
    dist.all_reduce(d, t, what="start-up all_reduce check")
    expected = d.world_size * (d.world_size + 1) / 2
    if t.item() != expected:
        problems.append(f"all_reduce of rank + 1 gave {t.item()}, expected {expected}: the interconnect returns "
                        "wrong data; run NCCL's all_reduce_perf, try NCCL_P2P_DISABLE=1 to locate it")
    warnings = [c.detail for c in host_checks() if c.status == "warn"] if d.local_rank == 0 else []
    for w in warnings:
        d.log(f"WARN {w}")
    if problems:
        raise LlavaMinError(f"rank {d.rank}: start-up check failed:\n  " + "\n  ".join(problems))
    d.print0(f"start-up check: {d.world_size} ranks on {len({f['host'] for f in everyone})} host(s) joined, "
             f"all_reduce correct")
    return warnings


def collective_checks(d: dist.Dist, bandwidth_mib: float) -> list[Check]:
    """quick_check, then the all-reduce bus bandwidth as nccl-tests reports it: 2 (n - 1) / n x bytes / time."""
    try:
        warnings = quick_check(d)
    except (LlavaMinError, dist.DistTimeout) as e:
        return [Check("fail", "collectives", str(e))]
    checks = [Check("ok", "collectives", f"barrier and all_reduce across {d.world_size} ranks ({d.backend}); "
                    + ("; ".join(warnings) if warnings else "no rank warned"))]
    x = torch.ones(max(1, int(bandwidth_mib * 2**20 / 4)), device=d.device)
    iters, nbytes = 10 if d.device.type == "cuda" else 3, x.numel() * 4
    sync = (lambda: torch.cuda.synchronize(d.device)) if d.device.type == "cuda" else (lambda: None)
    try:
        for rounds in (2, iters):                   # a warm-up (connections, NCCL channels), then the timed rounds
            sync()
            start = time.perf_counter()
            for _ in range(rounds):
                dist.all_reduce(d, x, what="bandwidth measurement")
            sync()
        seconds = (time.perf_counter() - start) / iters
    except dist.DistTimeout as e:
        return checks + [Check("fail", "collectives", str(e))]
    bus = 2 * (d.world_size - 1) / d.world_size * nbytes / seconds
    checks.append(Check("info", "collectives", f"all_reduce of {nbytes / 2**20:.0f} MiB: {seconds * 1e3:.1f} ms, "
                        f"bus bandwidth {bus / 1e9:.2f} GB/s"))
    return checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", type=float, default=60, help="seconds for the preflight barrier and all-reduce")
    p.add_argument("--bandwidth-mib", type=float, default=None,
                   help="all-reduce size for the bandwidth figure (default 256 on GPUs, 16 on CPU)")
    args = p.parse_args(argv)

    checks = rank_checks()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank == 0:            # one report per node for what the node's ranks share
        checks = version_checks() + gpu_checks() + host_checks() + environment_checks() + checks
    elif torch.cuda.is_available():
        checks = gpu_checks(all_devices=False) + checks
    distributed = "RANK" in os.environ and not any(c.status == "fail" for c in checks)
    d = dist.setup(timeout_s=args.timeout) if distributed else dist.Dist()
    try:
        if distributed:
            checks += collective_checks(d, args.bandwidth_mib or (256 if d.device.type == "cuda" else 16))
        shown = checks if local_rank == 0 else [c for c in checks if c.status in ("warn", "fail")]
        for c in shown:
            d.log(c.line())
        failed = sum(c.status == "fail" for c in checks)
        if d.is_distributed and not any(c.name == "collectives" and c.status == "fail" for c in checks):
            failed = sum(dist.all_gather_object(d, failed, what="doctor results"))
        warned = sum(c.status == "warn" for c in checks)
        d.print0(f"doctor: {failed} failure(s)" + (" across all ranks" if d.is_distributed else "")
                 + f", {warned} warning(s)" + (" on rank 0" if d.is_distributed else ""))
    finally:
        dist.teardown(d)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
