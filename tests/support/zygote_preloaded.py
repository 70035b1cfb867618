"""What the fork server of ``tests/unit/test_zygote.py`` imports before it forks: a module that reads an
environment variable while it is imported, so a launch that sets it differently must not be forked."""

from __future__ import annotations

import os

AT_IMPORT = os.environ.get("TEXTGEN_PROBE_AT_IMPORT")
