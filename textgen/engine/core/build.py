"""Build the fused CPU kernels (fused.c) at set-up: ``python -m textgen.engine.core.build`` (``make setup``).

It compiles the library for this CPU and compiler into the service user's kernel folder (the folder rules
of fused.py: created 0700, owned by this user, no symlink on the way) and loads it once to prove that it
works, so that a server only loads it. Already built: it only checks and loads it (a second or two).

Exit status: 0 when the library is built and loads, and also when there is no C compiler at all (the
service then runs its PyTorch paths, slower; the warning says how to fix it); 1 when a compiler exists but
the build or the folder failed (the message says why and what to do), 2 on a bad command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from textgen.engine.core.fused import VARIANTS, build_fused_kernels, find_compiler, kernel_folder

logger = logging.getLogger("textgen.engine.core.build")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m textgen.engine.core.build", description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=None, help=f"kernel folder (default {kernel_folder()})")
    parser.add_argument(
        "--variant", choices=sorted(VARIANTS), default="native",
        help="native: the service's build; scalar: without AVX-512 (tests); sanitize: ASan/UBSan (tests)",
    )
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder = (arguments.folder or kernel_folder()).absolute()
    if find_compiler() is None:
        build = build_fused_kernels(folder, VARIANTS[arguments.variant], at_setup=True)  # logs the warning
        logger.warning("No C compiler: the server will run its PyTorch paths (slower). %s", build.problem)
        return 0
    build = build_fused_kernels(folder, VARIANTS[arguments.variant], at_setup=True)
    if build.kernels is None:
        logger.error("Fused CPU kernels not built: %s", build.problem)
        return 1
    logger.info("Fused CPU kernels ready in %s (build %s, Q4 x int8 product: %s)", folder,
                build.kernels.build_key, "yes" if build.kernels.q4_supported else "no, this CPU lacks AVX-512 VNNI")
    return 0


if __name__ == "__main__":
    sys.exit(main())
