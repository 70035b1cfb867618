"""The one leased poll-loop worker: the job runner, the batch coordinator and webhook delivery each run
their work in a ``PollLoop``.

A loop runs ``step()`` once per poll: at once after ``notify()``, else every ``poll_interval_s``; a step
that answers True (more work is ready now) is followed by the next at once, without waiting. A store
that is unreachable or out of space fails the step with ``StoreUnavailableError`` /
``InsufficientStorageError``: the store already logged that condition once (``textgen.storage.conditions``),
so the loop only tries again at the next poll. Anything else is logged with its traceback, and the
loop goes on.

With ``renew``, a second task calls it every third of ``lease_s``, so the leases of the work this process
holds are renewed twice before they could run out; its failures are handled as the step's.

Time is injected: ``wait(event, timeout_s)`` (True when ``event`` was set, False when the time ran out)
is the only way either task waits, so tests drive the loop with a fake timer and never sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from textgen.errors import InsufficientStorageError, StoreUnavailableError

logger = logging.getLogger(__name__)

Step = Callable[[], Awaitable[bool]]  # True: more work is ready now (no pause before the next step)
Renew = Callable[[], Awaitable[None]]
Wait = Callable[[asyncio.Event, float], Awaitable[bool]]

# The store's conditions (disk full, Redis out of memory or unreachable) are logged once by the store.
STORE_CONDITIONS = (StoreUnavailableError, InsufficientStorageError)


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set (True) or ``timeout_s`` has passed (False): the real clock."""
    try:
        await asyncio.wait_for(event.wait(), timeout=timeout_s)
    except TimeoutError:
        return False
    return True


class PollLoop:
    def __init__(
        self,
        name: str,
        step: Step,
        *,
        poll_interval_s: float,
        renew: Renew | None = None,
        lease_s: float | None = None,
        wait: Wait = wait_event,
    ) -> None:
        if renew is not None and (lease_s is None or lease_s <= 0):
            raise ValueError("a loop that renews leases needs lease_s > 0")
        self.name = name
        self.polls = 0  # completed steps: a positive signal tests (and debugging) can wait for
        self.renewals = 0  # completed renewal rounds
        self._step = step
        self._poll_interval_s = poll_interval_s
        self._renew = renew
        self._lease_s = lease_s or 0.0
        self._wait = wait
        self._wakeup = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def stopping(self) -> bool:
        return self._stopped.is_set()

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run_steps(), name=self.name))
        if self._renew is not None:
            self._tasks.append(asyncio.create_task(self._run_renewals(), name=f"{self.name}-leases"))

    def notify(self) -> None:
        """Run the next step now rather than at the next poll."""
        self._wakeup.set()

    async def stop(self) -> None:
        """Stop both tasks (a step in progress is cancelled); idempotent."""
        self._stopped.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _run_steps(self) -> None:
        while not self.stopping:
            more = await self._guarded(self._step, "iteration")
            self.polls += 1
            if more:
                await asyncio.sleep(0)  # let other tasks run between back-to-back steps
                continue
            self._wakeup.clear()
            await self._wait(self._wakeup, self._poll_interval_s)

    async def _run_renewals(self) -> None:
        assert self._renew is not None
        renew = self._renew

        async def round_() -> bool:
            await renew()
            return False

        while not await self._wait(self._stopped, self._lease_s / 3):
            await self._guarded(round_, "lease renewal")
            self.renewals += 1

    async def _guarded(self, step: Step, what: str) -> bool:
        try:
            return await step()
        except STORE_CONDITIONS:
            return False  # logged once by the store; tried again at the next poll
        except Exception:
            logger.exception("%s: %s failed; retrying", self.name, what)
            return False
