"""Named request workloads beyond the default short prompts: what a feature is measured on.

``repeat``: repeat a ~300-token passage from the prompt, greedily (drafts looked up in the prompt are mostly
accepted: speculative decoding's best case). ``open``: a story from a short prompt, sampled (drafts mostly
rejected: its worst case). Each is a chat request for ``/v1/chat/completions`` (the model's chat template).
"""

from __future__ import annotations

from typing import Any

WORKLOADS = ("repeat", "open")

PASSAGE = (
    "The harbour town woke slowly on winter mornings. Before the sun cleared the hills, the fishermen carried "
    "their nets down the stone steps to the boats, and the baker on Quay Street lit the ovens that had warmed "
    "the same corner for ninety years. By seven the gulls had found the fish market, where the auctioneer "
    "called prices in a voice that carried across the water. Children walked to the school on the hill in "
    "pairs, their breath white in the cold air, and the ferry sounded its horn twice as it left for the "
    "islands. At the end of the pier an old man repainted the blue railings every spring, one section a week, "
    "so that by the time he reached the far end the first sections had faded again. He said he did not mind: "
    "the work gave him a reason to watch the boats come in. In the afternoons the light turned gold over the "
    "lighthouse, the cafes filled with walkers, and the tide came up the slipway, lifting the small boats "
    "that had rested on the sand. When the lamps came on along the front, the town grew quiet again, and the "
    "only sounds were the water against the harbour wall and the distant bell of the buoy beyond the point."
)

STORY_PROMPTS = (
    "Write a short story about a robot who learns to paint.",
    "Tell the story of a lost cat finding its way home through a busy city.",
    "Write a story about a girl who finds a map in her grandmother's attic.",
    "Tell a story about two rival bakers who must work together for a festival.",
)


def chat_payload(workload: str, index: int, max_new_tokens: int, model: str = "default") -> dict[str, Any]:
    """The index-th request of ``workload`` as a /v1/chat/completions body."""
    if workload == "repeat":
        content = f"Repeat the following passage word for word, and nothing else.\n\n{PASSAGE}"
        sampling: dict[str, Any] = {"temperature": 0.0}
    elif workload == "open":
        content = STORY_PROMPTS[index % len(STORY_PROMPTS)]
        sampling = {"temperature": 0.8, "top_p": 0.95, "ignore_eos": True}
    else:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_new_tokens,
        **sampling,
    }
