"""llava-min: a minimal, pure-PyTorch LLaVA-InternLM2 (DINOv2 ViT -> MLP projector -> InternLM2).

Reading order: internlm2.py, dinov2.py, projector.py, llava.py, then tokenizer.py, data.py, image.py,
loader.py, and the two training scripts at the repository root.
"""
IMAGE_TOKEN_INDEX = -200  # placeholder id in input_ids for one image; not a vocabulary id
IGNORE_INDEX = -100       # label value that the loss ignores

from .internlm2 import InternLM2, InternLM2Config  # noqa: E402
from .dinov2 import DINOv2, DINOv2Config  # noqa: E402
from .projector import Projector  # noqa: E402
from .llava import LLaVA  # noqa: E402
from .tokenizer import Tokenizer  # noqa: E402

__all__ = ["InternLM2", "InternLM2Config", "DINOv2", "DINOv2Config", "Projector", "LLaVA", "Tokenizer",
           "IMAGE_TOKEN_INDEX", "IGNORE_INDEX"]
