"""Prefix caching and chunked prefill, measured over HTTP against real servers, cache on vs off in one run.

    python -m bench.prefix --workload chat                  # 8 users x 3 turns on a ~1,000-token system prompt
    python -m bench.prefix --workload long                  # a ~6,000-token prompt beside 32 short streams
    python -m bench.prefix --workload chat --users 2 --turns 2 --system-words 80 --max-new-tokens 8   # smoke
    python -m bench.prefix --workload long --streams 2 --long-words 300 --duration 2 --max-new-tokens 16  # smoke

Servers are started as ``bench.bench`` starts them (batched engine, a throw-away job store, other
``TEXTGEN_*`` variables pass through) with ``TEXTGEN_MAX_PROMPT_TOKENS`` (and ``TEXTGEN_MAX_PREFILL_TOKENS``)
raised for the long prompts; ``chat`` starts one with ``TEXTGEN_PREFIX_CACHE=true`` and one with ``false``
(``--url`` drives one running server instead).

``chat``: every user sends the same system prompt (``--system-words`` words, ~1,000 tokens by default) and its
own questions over ``--turns`` turns, the assistant's answers resent each turn (as chat clients do), streamed
from ``/v1/chat/completions`` with usage. Time to first token is the first content chunk. Users run one at a
time (C=1), then all at once (C=users). Reported per server and level: p50/p90 time to first token of the
first turn and of later turns, and the mean ``usage.prompt_tokens_details.cached_tokens``. The issue's target:
a turn with its prefix cached answers its first token in at most 1/5 of the uncached time, cached_tokens >= 800.

``long``: ``--streams`` closed-loop short streams (``/v1/completions``, ``ignore_eos``); after ``--duration``
seconds alone a ``--long-words`` prompt (~6,000 tokens) is sent once (max_tokens 1). The streams' rate is
their received content chunks per second: alone before it, while it is prefilled (until it answers), and
after it. Target: the rate while it is prefilled is at least 0.7 of the rate alone (chunked prefill).

Results: a table on stdout and ``--out``/prefix-<workload>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as ``python bench/prefix.py``
    sys.path.insert(0, str(REPO_ROOT))

from bench.bench import OPENAI_MODEL, add_server_arguments, make_client, served  # noqa: E402

LOG = logging.getLogger("bench.prefix")
TOPICS = ("invoices", "shipping", "refunds", "accounts", "warranty", "returns", "billing", "security")


def system_prompt(words: int) -> str:
    """A long, fixed system prompt (an agent's instructions): numbered rules until ``words`` words."""
    rules, count, number = [], 0, 1
    while count < words:
        topic = TOPICS[number % len(TOPICS)]
        rule = f"Rule {number}: when a customer asks about {topic}, check the record, explain the policy plainly, "
        rule += "and never promise what the policy does not allow."
        rules.append(rule)
        count += len(rule.split())
        number += 1
    return "You are the support assistant of a small company. Follow these rules.\n" + "\n".join(rules)


def long_text(words: int) -> str:
    body = system_prompt(words)
    return f"Summarise the following document in one sentence.\n\n{body}"


async def stream_chat(
    client: httpx.AsyncClient, messages: list[dict[str, str]], max_new_tokens: int
) -> tuple[float, str, int]:
    """(time to first content chunk, the reply's text, cached prompt tokens) of one streamed chat turn."""
    body = {
        "model": OPENAI_MODEL,
        "messages": messages,
        "max_tokens": max_new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.monotonic()
    first: float | None = None
    text, cached = [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            payload = json.loads(line[6:])
            if "error" in payload:
                raise RuntimeError(payload["error"].get("message", "stream error"))
            if payload.get("usage"):
                cached = int((payload["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            for choice in payload.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    first = first if first is not None else time.monotonic() - started
                    text.append(content)
    return (first if first is not None else time.monotonic() - started), "".join(text), cached


async def chat_user(
    client: httpx.AsyncClient, user: int, system: str, turns: int, max_new_tokens: int
) -> list[tuple[int, float, int]]:
    """One user's conversation: (turn, time to first token, cached tokens) per turn."""
    messages = [{"role": "system", "content": system}]
    rows = []
    for turn in range(turns):
        question = f"I am customer {user}. Question {turn + 1}: what do rules {user + turn + 1} and {turn + 7} say?"
        messages.append({"role": "user", "content": question})
        ttft, reply, cached = await stream_chat(client, messages, max_new_tokens)
        messages.append({"role": "assistant", "content": reply})
        rows.append((turn, ttft, cached))
    return rows


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def chat_summary(rows: list[tuple[int, float, int]]) -> dict[str, Any]:
    first = [ttft for turn, ttft, _ in rows if turn == 0]
    later = [ttft for turn, ttft, _ in rows if turn > 0]
    return {
        "turns": len(rows),
        "ttft_p50_first_turn_s": _percentile(first, 0.5),
        "ttft_p50_later_turns_s": _percentile(later, 0.5),
        "ttft_p50_all_s": _percentile([t for _, t, _ in rows], 0.5),
        "ttft_p90_all_s": _percentile([t for _, t, _ in rows], 0.9),
        "cached_tokens_mean": statistics.fmean(c for _, _, c in rows) if rows else 0.0,
        "cached_tokens_mean_later_turns": statistics.fmean(c for t, _, c in rows if t > 0) if later else 0.0,
    }


async def measure_chat(base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    system = system_prompt(args.system_words)
    result: dict[str, Any] = {}
    async with make_client(base_url, args.users, args.request_timeout) as client:
        await stream_chat(client, [{"role": "user", "content": "Hello"}], 4)  # warm
        sequential: list[tuple[int, float, int]] = []
        for user in range(args.users):
            sequential += await chat_user(client, user, system, args.turns, args.max_new_tokens)
        result["c1"] = chat_summary(sequential)
        # New users (new questions) for the concurrent level: only the system prompt is shared with before.
        together = await asyncio.gather(
            *(chat_user(client, 100 + user, system, args.turns, args.max_new_tokens) for user in range(args.users))
        )
        result[f"c{args.users}"] = chat_summary([row for rows in together for row in rows])
    return result


async def short_stream(client: httpx.AsyncClient, worker: int, max_new_tokens: int, stamps: list[float]) -> None:
    index = worker
    while True:
        body = {
            "model": OPENAI_MODEL,
            "prompt": f"Stream {index}: write about the sea and the harbour town.",
            "max_tokens": max_new_tokens,
            "temperature": 0.8,
            "ignore_eos": True,
            "stream": True,
        }
        try:
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                async for line in reply.aiter_lines():
                    if line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                        stamps.append(time.monotonic())
        except httpx.HTTPError as error:
            LOG.warning("stream %d failed: %s", worker, error)
        index += 1


async def measure_long(base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    stamps: list[float] = []
    async with make_client(base_url, args.streams + 2, args.request_timeout) as client:
        tasks = [asyncio.create_task(short_stream(client, i, args.max_new_tokens, stamps)) for i in range(args.streams)]
        await asyncio.sleep(args.ramp)
        alone_start = time.monotonic()
        await asyncio.sleep(args.duration)
        long_start = time.monotonic()
        body = {"model": OPENAI_MODEL, "prompt": long_text(args.long_words), "max_tokens": 1, "temperature": 0}
        reply = await client.post("/v1/completions", json=body)
        long_end = time.monotonic()
        if reply.status_code != 200:
            raise RuntimeError(f"the long prompt failed: HTTP {reply.status_code} {reply.text[:300]}")
        await asyncio.sleep(args.duration)
        after_end = time.monotonic()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def rate(start: float, end: float) -> float:
        return sum(start <= s < end for s in stamps) / max(end - start, 1e-9)

    alone, during, after = rate(alone_start, long_start), rate(long_start, long_end), rate(long_end, after_end)
    return {
        "long_prompt_tokens": reply.json()["usage"]["prompt_tokens"],
        "long_prompt_latency_s": long_end - long_start,
        "streams_chunks_per_s_alone": alone,
        "streams_chunks_per_s_during_prefill": during,
        "streams_chunks_per_s_after": after,
        "ratio_during_vs_alone": during / alone if alone else None,
    }


def run_server(args: argparse.Namespace, scratch: Path, cache: bool) -> dict[str, Any]:
    env = dict(os.environ, TEXTGEN_PREFIX_CACHE="true" if cache else "false")
    env.setdefault("TEXTGEN_MAX_PROMPT_TOKENS", str(args.max_prompt_tokens))
    env.setdefault("TEXTGEN_MAX_PREFILL_TOKENS", env["TEXTGEN_MAX_PROMPT_TOKENS"])
    with served(args, scratch / f"jobs-{cache}.db", env) as base_url:
        return asyncio.run(measure(base_url, args))


def measure(base_url: str, args: argparse.Namespace) -> Any:
    return measure_chat(base_url, args) if args.workload == "chat" else measure_long(base_url, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=("chat", "long"), required=True)
    parser.add_argument("--url", default=None, help="an already running server (default: start them)")
    parser.add_argument("--users", type=int, default=8, help="chat: users (default 8)")
    parser.add_argument("--turns", type=int, default=3, help="chat: turns per user (default 3)")
    parser.add_argument("--system-words", type=int, default=620, help="chat: system prompt words (~1,000 tokens)")
    parser.add_argument("--streams", type=int, default=32, help="long: short streams (default 32)")
    parser.add_argument("--long-words", type=int, default=3900, help="long: prompt words (~6,000 tokens)")
    parser.add_argument("--duration", type=float, default=20.0, help="long: seconds alone, and after (default 20)")
    parser.add_argument("--ramp", type=float, default=5.0, help="long: seconds before counting (default 5)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per reply (default 64)")
    parser.add_argument("--max-prompt-tokens", type=int, default=7000, help="TEXTGEN_MAX_PROMPT_TOKENS to serve with")
    add_server_arguments(parser)
    return parser


def render(result: dict[str, Any]) -> str:
    lines = []
    for server, levels in result.items():
        lines.append(f"[{server}]")
        for name, values in levels.items() if isinstance(levels, dict) else []:
            if isinstance(values, dict):
                shown = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
                lines.append(f"  {name}: {shown}")
            else:
                lines.append(f"  {name}: {values:.3f}" if isinstance(values, float) else f"  {name}: {values}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="textgen-bench-prefix-") as scratch:
        if args.url is not None:
            result = {"server": run_server(args, Path(scratch), cache=True)}  # the running server's settings
        else:
            servers = (True, False) if args.workload == "chat" else (True,)
            result = {f"cache-{'on' if cache else 'off'}": run_server(args, Path(scratch), cache) for cache in servers}
    (args.out / f"prefix-{args.workload}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
