"""FLOPs of one forward + backward, for the model FLOPs utilisation (MFU) train.py logs on CUDA.

Per token, a weight matrix of N parameters costs 2N FLOPs forward; backward adds 2N for the input's gradient
(when gradients flow through it to something trained before it) and 2N for the weight's own gradient (when
it trains). Hence: 6N for trained weights (the projector, the LLM in stage 2, LoRA adapters), 4N for frozen
weights that gradients flow through (the LLM in stage 1, LoRA's frozen base), 2N for forward-only parts (a
frozen ViT, run under no_grad). The output head counts on supervised positions only (llava-min computes no
other logits). Attention adds, per layer and per sample of L positions, 2 L^2 d forward for the LLM (QK^T and
AV, causal: half of 4 L^2 d) and 4 L^2 d for the ViT (not causal), times 3 where backward runs; d is the width.
Packed samples count their own L: attention never crosses them. MFU = FLOPs / (seconds x processes x peak).
"""
from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of the device name (as bench/gpu.py).
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
               "H100": 756.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.0}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def _weights(module: torch.nn.Module, flows: bool) -> float:
    """FLOPs per token of the module's weight matrices (biases and norms are noise)."""
    return sum((6 if p.requires_grad else 4 if flows else 2) * p.numel() for p in module.parameters() if p.dim() > 1)


class StepFlops:
    """flops(output, n_images) of one micro-batch of train.py's model; the per-token constants computed once."""

    def __init__(self, model, image_tokens: int):
        llm, vit, v = model.llm, model.vit, model.vit.config
        vit_trains = any(p.requires_grad for p in vit.parameters())
        flows = vit_trains or any(p.requires_grad for p in model.projector.parameters())
        blocks = v.blocks_run(model.config.select_layer)
        self.llm_token = _weights(llm.model.layers, flows)           # embedding lookups cost nothing
        self.head_token = _weights(llm.output, flows)
        self.width, self.layers = llm.config.hidden_size, llm.config.num_hidden_layers
        vit_tokens = 1 + v.num_register_tokens + image_tokens
        self.image = (image_tokens * _weights(model.projector, vit_trains)
                      + vit_tokens * _weights(vit.encoder.layer[:blocks], False)
                      + blocks * 4 * vit_tokens ** 2 * v.hidden_size * (3 if vit_trains else 1))

    def __call__(self, out, n_images: int) -> float:
        mask = out.attention_mask                                   # (B, T'), k on the k-th sample of a row
        keys = (torch.arange(mask.shape[0], device=mask.device)[:, None] * (int(mask.max()) + 1) + mask)[mask > 0]
        lengths = torch.unique(keys, return_counts=True)[1].double()   # (samples,) positions of each sample
        return float(lengths.sum() * self.llm_token + out.num_tokens * self.head_token
                     + 6 * self.layers * self.width * (lengths ** 2).sum() + n_images * self.image)
