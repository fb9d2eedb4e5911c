"""Stage 2 of LLaVA training: visual instruction tuning (projector + LLM, or the LLM through LoRA).

It is train.py with stage-2 defaults (lr 2e-5, --train projector,llm); start it from a stage-1
folder, whose tokenizer, image size and mode, max length and system prompt it inherits (and says so):

    python finetune.py --init-from out/stage1 --data data/shapes/finetune.json \\
        --image-folder data/shapes --out out/stage2
    torchrun --nproc_per_node 4 finetune.py --init-from out/pretrain \\
        --data llava_v1_5_mix665k.json --image-folder llava_images \\
        --batch-size 4 --grad-accum 8 --grad-checkpointing --out out/finetune
    torchrun --nproc_per_node 4 finetune.py --init-from out/pretrain ... \\
        --lora-r 128 --lr 2e-4                                                    # LoRA

Before the first step it prints a memory estimate per GPU (python -m llava_min.memory gives the
same with the same flags), and a CUDA out-of-memory error is followed by the flags that would make
the run fit.
"""
import train

if __name__ == "__main__":
    train.main(stage=2)
