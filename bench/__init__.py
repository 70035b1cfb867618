"""Load benchmark of the text-generation service: ``python -m bench.bench --help``."""

import textgen  # noqa: F401 - its OpenMP default (textgen/openmp.py) must precede torch, as in the server
