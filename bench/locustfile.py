"""Locust load profile: users posting short ``/generate`` requests to a running server.

    locust -f bench/locustfile.py --host http://127.0.0.1:8000                       # web UI
    locust -f bench/locustfile.py --host http://127.0.0.1:8000 --headless -u 20 -r 10 -t 30s --csv out/locust

Load shedding is intended behaviour, not an error: a 503 (queue full) or 429 (rate limited) that carries
an integer ``Retry-After`` >= 1 counts as a success, reported under its own name ("/generate [shed 503]",
"/generate [shed 429]") so the stats show how much was shed. Everything else that is not a 200 with the
requested number of tokens is a failure: another status, a shed response without ``Retry-After``, a body
that is not the documented JSON, a connection error or a timeout.

Settings (environment): ``TEXTGEN_LOCUST_MAX_NEW_TOKENS`` (default 8) tokens per request, generated
exactly (``ignore_eos``); ``TEXTGEN_LOCUST_TIMEOUT_S`` (default 120) per-request timeout;
``TEXTGEN_LOCUST_MAX_BACKOFF_S`` (default 2): after a shed response a user waits what ``Retry-After`` says,
at most this long; and ``TEXTGEN_LOCUST_API_KEY``, sent as ``Authorization: Bearer`` when the server
requires keys.
"""

from __future__ import annotations

import itertools
import os
import random

from locust import HttpUser, task

MAX_NEW_TOKENS = int(os.environ.get("TEXTGEN_LOCUST_MAX_NEW_TOKENS", "8"))
TIMEOUT_S = float(os.environ.get("TEXTGEN_LOCUST_TIMEOUT_S", "120"))
MAX_BACKOFF_S = float(os.environ.get("TEXTGEN_LOCUST_MAX_BACKOFF_S", "2"))
API_KEY = os.environ.get("TEXTGEN_LOCUST_API_KEY", "")
SHED_STATUSES = (429, 503)
PROMPTS = (
    "The future of AI is",
    "Once upon a time, in a quiet harbour town,",
    "Three tips for writing clear documentation:",
    "The best way to learn a new language is",
)
_prompt_numbers = itertools.count()


class GenerateUser(HttpUser):
    _backoff_s = 0.0

    def wait_time(self) -> float:
        """0-200 ms between requests; after a shed response, what Retry-After asked (capped), as a
        well-behaved client would."""
        backoff, self._backoff_s = self._backoff_s, 0.0
        return max(random.uniform(0.0, 0.2), backoff)

    def on_start(self) -> None:
        if API_KEY:
            self.client.headers["Authorization"] = f"Bearer {API_KEY}"

    @task
    def generate(self) -> None:
        number = next(_prompt_numbers)
        body = {
            "prompt": f"{PROMPTS[number % len(PROMPTS)]} ({number})",
            "max_new_tokens": MAX_NEW_TOKENS,
            "ignore_eos": True,
        }
        with self.client.post(
            "/generate", json=body, name="/generate", timeout=TIMEOUT_S, catch_response=True
        ) as response:
            status = response.status_code
            if status == 200:
                try:
                    tokens = response.json().get("completion_tokens")
                except ValueError:
                    response.failure("200 with a body that is not JSON")
                    return
                if tokens != MAX_NEW_TOKENS:
                    response.failure(f"200 with {tokens!r} completion tokens, expected {MAX_NEW_TOKENS}")
                else:
                    response.success()
            elif status in SHED_STATUSES:
                retry_after = response.headers.get("Retry-After", "")
                if not retry_after.isdigit() or int(retry_after) < 1:
                    response.failure(f"{status} without a valid Retry-After (got {retry_after!r})")
                    return
                # Intended shedding: a success, kept apart from the served requests in the stats.
                self._backoff_s = min(float(retry_after), MAX_BACKOFF_S)
                response.request_meta["name"] = f"/generate [shed {status}]"  # type: ignore[index]
                response.success()
            else:
                response.failure(f"unexpected status {status}: {response.text[:200]}")
