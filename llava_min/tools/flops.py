"""FLOPs of one forward + backward, for the model FLOPs utilisation (MFU) train.py logs on CUDA.

Per token, a weight matrix of N parameters costs 2N FLOPs forward; backward adds 2N for the input's
gradient (when gradients flow through it to something trained before it, or beside it) and 2N for
the weight's own gradient (when it trains). Hence: 6N for trained weights (the projector, the LLM
in stage 2, LoRA adapters), 4N for frozen weights that gradients flow through (the LLM in stage 1,
LoRA's frozen base and the frozen head), 2N for forward-only parts (a frozen ViT, run under
no_grad). The output head counts on supervised positions only (llava-min computes no other logits).
Attention adds, per layer and per sample of L positions, 2 L^2 d forward for the LLM (QK^T and AV,
causal: half of 4 L^2 d) and 4 L^2 d for the ViT (not causal), times 3 where backward runs; d is
the width. Packed samples count their own L: attention never crosses them. MFU = FLOPs / (seconds x
processes x peak), the peak of the dtype the matrix products really run in.
"""
from __future__ import annotations

import torch

# Dense peaks (no sparsity), TFLOP/s, by a substring of the device name (as bench/gpu.py): bf16 /
# fp16 tensor cores, TF32 tensor cores (fp32 matmuls when torch allows TF32), and plain fp32
# (torch's default for fp32).
PEAK_TFLOPS = {
    "H200": (989.0, 494.7, 66.9),
    "H100 SXM": (989.0, 494.7, 66.9),
    "H100 80GB HBM3": (989.0, 494.7, 66.9),
    "H100 NVL": (835.0, 417.5, 60.0),
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H100": (756.0, 378.0, 51.2),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.0, 181.0, 91.6),
    "A10G": (70.0, 35.0, 31.2),
    "RTX 4090": (165.0, 82.6, 82.6),
}


def peak_for(name: str, dtype: torch.dtype, tf32: bool) -> float | None:
    """FLOP/s of a device called `name` for matrix products in `dtype` (None: an unknown
    device)."""
    peaks = next((value for key, value in PEAK_TFLOPS.items() if key in name), None)
    if peaks is None:
        return None
    half, tensor_fp32, plain_fp32 = peaks
    if dtype in (torch.bfloat16, torch.float16):
        return half * 1e12
    if tf32:
        return tensor_fp32 * 1e12
    return plain_fp32 * 1e12


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The peak of the dtype train.py computes in (autocast's, or fp32 with or without TF32) on
    this GPU."""
    if device.type != "cuda":
        return None
    tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
    return peak_for(torch.cuda.get_device_name(device), dtype, tf32)


def _weights(module: torch.nn.Module, flows: bool) -> float:
    """FLOPs per token of the module's weight matrices (biases and norms are noise)."""
    total = 0
    for p in module.parameters():
        if p.dim() < 2:
            continue
        if p.requires_grad:
            total += 6 * p.numel()
        elif flows:
            total += 4 * p.numel()
        else:
            total += 2 * p.numel()
    return total


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class StepFlops:
    """flops(output, n_images) of one micro-batch of train.py's model; the per-token constants
    computed once."""

    def __init__(self, model, image_tokens: int):
        llm = model.llm
        vit = model.vit
        v = vit.config
        vit_trains = _trains(vit)
        # Gradients run back through the whole LLM when anything in it or before it trains (LoRA
        # adapters included: their frozen base weights pass the gradient on).
        flows = vit_trains or _trains(model.projector) or _trains(llm)
        blocks = v.blocks_run(model.config.select_layer)
        # embedding lookups cost nothing
        self.llm_token = _weights(llm.layers, flows)
        self.head_token = _weights(llm.output, flows)
        self.width = llm.config.hidden_size
        self.layers = llm.config.num_hidden_layers
        vit_tokens = v.prefix_tokens + image_tokens
        if vit_trains:
            vit_attention = 3 * 4 * vit_tokens ** 2 * v.hidden_size
        else:
            vit_attention = 4 * vit_tokens ** 2 * v.hidden_size
        self.image = (image_tokens * _weights(model.projector, vit_trains)
                      + vit_tokens * _weights(vit.blocks[:blocks], False)
                      + blocks * vit_attention)

    def __call__(self, out, n_images: int) -> float:
        # (B, T'), k on the k-th sample of a row
        mask = out.attention_mask
        keys = (torch.arange(mask.shape[0], device=mask.device)[:, None] * (int(mask.max()) + 1) + mask)[mask > 0]
        # (samples,) positions of each sample
        lengths = torch.unique(keys, return_counts=True)[1].double()
        return float(lengths.sum() * self.llm_token + out.num_tokens * self.head_token
                     + 6 * self.layers * self.width * (lengths ** 2).sum() + n_images * self.image)
