"""`python -m llava_min.memory`: the GPU and host memory estimate of llava_min/tools/memory.py."""
import sys

from .tools.memory import *  # noqa: F401,F403  (the old import path keeps working)
from .tools.memory import main

if __name__ == "__main__":
    sys.exit(main())
