"""`python -m llava_min.doctor`: the environment and collective checks of llava_min/tools/doctor.py."""
import sys

from .tools.doctor import *  # noqa: F401,F403  (the old import path keeps working)
from .tools.doctor import main

if __name__ == "__main__":
    sys.exit(main())
