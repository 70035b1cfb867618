"""RequestThreads: the per-request helper threads of a model's generation service.

A request whose result arrived just as its model was unloaded (or the server began to stop) still has its
text filtered in these threads after the service was closed; that must not fail the request (it once gave
a 500 during a SIGTERM drain: the engine had answered, the executor was shut before the filter ran).
"""

from __future__ import annotations

import asyncio
import threading

from textgen.threads import RequestThreads


async def test_work_handed_in_after_close_still_runs_off_the_event_loop() -> None:
    threads = RequestThreads(workers=1)
    threads.close()
    loop_thread = threading.get_ident()

    ran_in = await threads.run(threading.get_ident)

    assert ran_in != loop_thread


async def test_work_queued_before_close_completes_instead_of_being_cancelled() -> None:
    threads = RequestThreads(workers=1)
    release = threading.Event()
    first = asyncio.ensure_future(threads.run(lambda: release.wait(10)))
    queued = asyncio.ensure_future(threads.run(lambda: "queued work done"))
    await asyncio.sleep(0)  # one turn of the loop: both tasks hand their work to the executor
    threads.close()
    release.set()

    assert await first is True
    assert await queued == "queued work done"
