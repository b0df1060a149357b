"""`python -m grc_jax.cli ...`: the `grc` command."""

import sys

from grc_jax.cli import main

sys.exit(main())
