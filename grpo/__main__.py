"""`python -m grpo train ...` / `python -m grpo eval ...` (the same as the `grpo` console script)."""

import sys

from .cli import main

sys.exit(main())
