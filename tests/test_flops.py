"""The FLOP count behind MFU (llava_min/tools/flops.py): which weights count 6N, 4N and 2N, and which peak.

Proves: a frozen weight that gradients pass through counts 4N, the LoRA base included (LoRA with the projector
frozen: the adapters upstream still need the gradient), a trained one 6N, a forward-only one 2N; the ViT's
tokens include its prefix (CLS for CLIP, none for SigLIP); and the peak is that of the dtype the matrix products
run in: bf16 tensor cores, TF32 when torch allows it, plain fp32 otherwise.
"""
import pytest
import torch

from llava_min.internlm2 import InternLM2, load_config as llm_config
from llava_min.llava import LLaVA, tower_of, vision_config
from llava_min.lora import apply_lora
from llava_min.projector import Projector
from llava_min.tools.flops import StepFlops, peak_for


def model(vit="tiny"):
    v = vision_config(vit)
    llava = LLaVA(InternLM2(llm_config("tiny")), tower_of(v)(v), Projector(v.hidden_size, 128))
    return llava.requires_grad_(False)


def matrices(module, trained=None):
    return sum(p.numel() for p in module.parameters() if p.dim() > 1 and (trained is None or p.requires_grad == trained))


def test_lora_base_counts_4n_and_adapters_6n():
    m = model()
    apply_lora(m.llm, r=4)                       # projector and ViT frozen: only the adapters train
    count = StepFlops(m, image_tokens=4)
    assert count.llm_token == 4 * matrices(m.llm.layers, False) + 6 * matrices(m.llm.layers, True)
    assert matrices(m.llm.layers, True) > 0
    assert count.head_token == 4 * m.llm.output.weight.numel()


def test_stage1_and_full_llm():
    m = model()
    m.projector.requires_grad_(True)
    count = StepFlops(m, image_tokens=4)
    assert count.llm_token == 4 * matrices(m.llm.layers)
    m.llm.requires_grad_(True)
    assert StepFlops(m, image_tokens=4).llm_token == 6 * matrices(m.llm.layers)
    m.requires_grad_(False)
    assert StepFlops(m, image_tokens=4).llm_token == 2 * matrices(m.llm.layers)


@pytest.mark.parametrize("vit,prefix", [("tiny", 1), ("tiny-clip", 1), ("tiny-siglip", 0)])
def test_vit_tokens_include_the_prefix(vit, prefix):
    m = model(vit)
    m.projector.requires_grad_(True)
    count = StepFlops(m, image_tokens=4)
    tokens = prefix + 4
    D = m.vit.config.hidden_size
    blocks = m.vit.blocks[:1]                    # layer -2 of 2 blocks: the first one runs
    expected = 4 * 6 * matrices(m.projector) + tokens * 2 * matrices(blocks) + 4 * tokens ** 2 * D
    assert count.image == expected


def test_peak_of_the_dtype_that_runs():
    assert peak_for("NVIDIA H100 80GB HBM3", torch.bfloat16, tf32=False) == 989e12
    assert peak_for("NVIDIA H100 80GB HBM3", torch.float32, tf32=True) == pytest.approx(494.7e12)
    assert peak_for("NVIDIA H100 80GB HBM3", torch.float32, tf32=False) == pytest.approx(66.9e12)
    assert peak_for("NVIDIA A100-SXM4-80GB", torch.float32, tf32=False) == pytest.approx(19.5e12)
    assert peak_for("Some GPU", torch.bfloat16, tf32=False) is None
