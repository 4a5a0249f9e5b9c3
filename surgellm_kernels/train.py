"""`python -m surgellm_kernels.train`: the command of surgellm_kernels.surgellm.train."""

import sys

from .surgellm.train import *  # noqa: F401,F403
from .surgellm.train import main

if __name__ == "__main__":
    sys.exit(main())
