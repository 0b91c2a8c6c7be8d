"""`python -m gem_jax ...` is the `gem-jax` command (for launchers that start Python, e.g. one
process per host: `python -m gem_jax heatmap ... --coordinator HOST:PORT --num-processes N
--process-id I`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
