"""`python -m surgellm_kernels.vocabulary`: the command of surgellm_kernels.surgellm.vocabulary."""

import sys

from .surgellm.vocabulary import *  # noqa: F401,F403
from .surgellm.vocabulary import main

if __name__ == "__main__":
    sys.exit(main())
