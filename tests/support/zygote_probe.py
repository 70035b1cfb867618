"""A trivial ``python -m`` target for the fork server's unit tests (``tests/unit/test_zygote.py``).

``python -m tests.support.zygote_probe ACTION [ARG]`` first prints one JSON line describing the process as
it finds itself (argv, cwd, session, environment variable PROBE, stdin, signal dispositions, numpy's first
random number when numpy is loaded), then:

* ``exit N`` - exits with code N;
* ``raise`` - raises an uncaught exception;
* ``wait`` - waits for a signal (a test kills it);
* ``group`` - starts a grandchild in its process group, prints its pid, then waits for a signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading


def describe() -> dict[str, object]:
    numpy = sys.modules.get("numpy")
    return {
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "sid": os.getsid(0),
        "probe": os.environ.get("PROBE"),
        "stdin": os.readlink("/proc/self/fd/0"),
        "sigint": repr(signal.getsignal(signal.SIGINT)),
        "sigterm": repr(signal.getsignal(signal.SIGTERM)),
        "numpy": float(numpy.random.random()) if numpy is not None else None,
    }


def main(argv: list[str]) -> int:
    sys.stdout.write(json.dumps(describe()) + "\n")
    action = argv[0]
    if action == "exit":
        return int(argv[1])
    if action == "raise":
        raise RuntimeError("the probe failed on purpose")
    if action == "group":
        grandchild = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
        sys.stdout.write(json.dumps({"grandchild": grandchild.pid}) + "\n")
    threading.Event().wait()  # until a test's signal ends the process
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
