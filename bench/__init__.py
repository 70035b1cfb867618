"""Load benchmark of the text-generation service: ``python -m bench.bench --help``."""
