"""`python -m surgellm_kernels.evaluate`: the command of surgellm_kernels.surgellm.evaluate."""

import sys

from .surgellm.evaluate import *  # noqa: F401,F403
from .surgellm.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
