"""Batch API files for tests: JSONL input lines, and a reference parser of OpenAI's batch output format."""

from __future__ import annotations

import json
from typing import Any

from openai.types import Completion
from openai.types.chat import ChatCompletion


def jsonl(items: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def completion_line(custom_id: str, prompt: str = "The future of AI is", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "default", "prompt": prompt, "max_tokens": 8, **body},
    }


def chat_line(custom_id: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"Say something about {custom_id}."}]
    body = {"model": "default", "messages": messages, "max_tokens": 8}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def parse_batch_output(content: bytes, endpoint: str) -> dict[str, dict[str, Any]]:
    """Reference parser of OpenAI's batch output/error file: one JSON object per line with ``id``,
    ``custom_id``, ``response`` (``status_code``, ``request_id``, ``body``) or null, and ``error`` (null or
    ``code`` + ``message``); a 200 body must parse as the endpoint's OpenAI response type. Returns the
    records by custom_id and fails on a custom_id seen twice."""
    records: dict[str, dict[str, Any]] = {}
    for raw in content.decode().splitlines():
        record = json.loads(raw)
        assert set(record) == {"id", "custom_id", "response", "error"}, record
        assert isinstance(record["id"], str) and record["id"].startswith("batch_req_")
        assert record["custom_id"] not in records, f"custom_id {record['custom_id']} answered twice"
        response, error = record["response"], record["error"]
        if response is None:
            assert set(error) >= {"code", "message"}, record
        else:
            assert error is None
            assert isinstance(response["status_code"], int) and isinstance(response["request_id"], str)
            if response["status_code"] == 200:
                model = ChatCompletion if endpoint == "/v1/chat/completions" else Completion
                model.model_validate(response["body"])
            else:
                assert isinstance(response["body"]["error"]["message"], str)
        records[record["custom_id"]] = record
    return records
