"""The held-out loss (llava_min/heldout.py) does not depend on how the set is split.

Proves: every sample lands on exactly one rank, in file order, and every rank runs as many batches
(FSDP needs that); the summed loss and token count of a tiny LLaVA on the shapes data are the same
for 1 rank and for the two ranks of a 2-rank split added up, and for any batch size (the loss to float32 rounding); the RNG state
and the model's training mode are as they were afterwards. (Through train.py under torchrun, with
resume: tests/test_stop.py.)
"""
import contextlib

import pytest
import torch

from llava_min.data import LLaVADataset
from llava_min.dinov2 import DINOv2, load_config as vit_config
from llava_min.dist import Dist
from llava_min.heldout import HeldOut, rank_batches
from llava_min.internlm2 import InternLM2, load_config as llm_config
from llava_min.llava import LLaVA
from llava_min.projector import Projector
from test_train import shapes  # noqa: F401 (a fixture)


@pytest.mark.parametrize("n,batch,world", [(10, 3, 1), (10, 3, 2), (7, 2, 4), (3, 4, 4), (12, 3, 4)])
def test_rank_batches_cover_every_sample_once_with_equal_counts(n, batch, world):
    seen = []
    counts = set()
    for rank in range(world):
        batches, real = rank_batches(n, batch, rank, world)
        counts.add(len(batches))
        assert all(i % world == rank for b in batches[:real] for i in b)
        seen += [i for b in batches[:real] for i in b]
    assert sorted(seen) == list(range(n))
    assert len(counts) == 1


def test_the_sums_do_not_depend_on_the_split(shapes):  # noqa: F811
    torch.manual_seed(0)
    llm = InternLM2(llm_config("tiny"))
    vit = DINOv2(vit_config("tiny"))
    model = LLaVA(llm, vit, Projector(vit.config.hidden_size, llm.config.hidden_size))
    model.train()
    image_tokens = vit.config.image_tokens(28)
    data = LLaVADataset(shapes / "finetune.json", shapes / "tok.model", shapes, image_size=28,
                        max_length=64, image_tokens=image_tokens)
    autocast = contextlib.nullcontext()

    def sums(batch_size: int, world: int) -> torch.Tensor:
        total = torch.zeros(2, dtype=torch.float64)
        for rank in range(world):
            held_out = HeldOut(data, batch_size, Dist(rank=rank, world_size=world))
            total += held_out.sums(model, autocast, step=1)
        return total

    rng = torch.get_rng_state()
    one = sums(8, 1)
    assert one[1] > 0
    # The tokens exactly; the loss to float32's rounding of batches padded differently.
    for batch_size, world in ((8, 2), (5, 3)):
        split = sums(batch_size, world)
        assert split[1] == one[1]
        assert split[0].item() == pytest.approx(one[0].item(), rel=1e-6)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
