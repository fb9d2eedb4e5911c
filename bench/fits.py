"""The README's "what fits" table, from the memory estimator (llava_min/tools/memory.py) alone.

    python bench/fits.py

Per cell: the largest micro-batch of 2048-token sequences (576 image tokens) with gradient checkpointing,
in brackets without it, then the per-GPU total at batch 1 with checkpointing. InternLM2 + DINOv2-large at
336 px, bf16 autocast with fp32 master weights, ViT frozen; `--zero` (ZeRO-1) or `--fsdp` on several GPUs.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llava_min import dinov2, internlm2  # noqa: E402
from llava_min.tools.memory import Plan, estimate, largest_batch  # noqa: E402

CARDS = [(1, 24), (4, 24), (4, 48), (8, 48), (4, 80), (8, 80)]
ROWS = [("internlm2-1_8b", "full (projector + LLM)", 0), ("internlm2-1_8b", "LoRA r=128", 128),
        ("internlm2-7b", "full (projector + LLM)", 0), ("internlm2-7b", "LoRA r=128", 128)]


def cell(plan: Plan, gpus: int, gib: int) -> str:
    plan = plan.replace(world_size=gpus)
    on, off = plan.replace(grad_checkpointing=True), plan
    total = estimate(on.replace(batch_size=1)).total / 2**30
    return f"{largest_batch(on, gib)} ({largest_batch(off, gib)}) · {total:.1f} GiB"


def main() -> None:
    vit = dinov2.load_config("dinov2-large")
    print("| LLM | trained | sharding | " + " | ".join(f"{n} x {g} GB" for n, g in CARDS) + " |")
    print("|---|---|---|" + "---|" * len(CARDS))
    for name, what, r in ROWS:
        base = Plan(llm=internlm2.load_config(name), vit=vit, lora_r=r, batch_size=1)
        shardings = {"DDP / --zero": {"zero": True}} | ({} if r else {"--fsdp": {"fsdp": True}})  # LoRA: DDP
        for label, flags in shardings.items():
            # one GPU: nothing to shard
            cells = [cell(base.replace(**flags) if n > 1 else base, n, g) for n, g in CARDS]
            print(f"| {name} | {what} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
