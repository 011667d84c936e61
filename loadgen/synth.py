"""Synthetic workloads as timed OpenAI requests: Zipf-popular system prompts, RAG documents, growing
multi-turn chats and several tenants. Deterministic for a seed."""

from __future__ import annotations

import random
from collections.abc import Callable

from loadgen.traces import RecordedRequest

KINDS = ("zipf", "rag", "multiturn", "tenants")
_WORDS = ("account order parcel route invoice refund policy warranty delivery store price stock label customer "
          "address return window carrier express region tax discount member support ticket status").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _zipf_pick(rng: random.Random, n: int, s: float) -> int:
    weights = [1 / (k + 1) ** s for k in range(n)]
    return rng.choices(range(n), weights=weights)[0]


def generate(kind: str, requests: int, rate: float, seed: int = 0, prompts: int = 20, zipf_s: float = 1.1,
             prompt_words: int = 400, max_tokens: int = 32, turns: int = 5,
             tenants: list[str] | None = None) -> list[RecordedRequest]:
    """`requests` requests at `rate` per second (Poisson arrivals)."""
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic workload {kind!r}; one of {', '.join(KINDS)}")
    rng = random.Random(seed)
    systems = [f"You are assistant #{i}. " + _text(random.Random(seed * 1000 + i), prompt_words)
               for i in range(prompts)]
    t = 0.0
    out: list[RecordedRequest] = []
    conversations: dict[int, list[dict[str, str]]] = {}

    def chat(messages: list[dict[str, str]], **extra) -> dict:
        return {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}

    makers: dict[str, Callable[[int], dict]] = {}

    def zipf(i: int) -> dict:
        sp = systems[_zipf_pick(rng, prompts, zipf_s)]
        return chat([{"role": "system", "content": sp}, {"role": "user", "content": _text(rng, 12) + "?"}])

    def rag(i: int) -> dict:
        doc = systems[_zipf_pick(rng, prompts, zipf_s)]
        return chat([{"role": "user", "content": f"Document:\n{doc}\n\nQuestion: {_text(rng, 10)}?"}])

    def multiturn(i: int) -> dict:
        c = rng.randrange(max(1, requests // turns))
        msgs = conversations.setdefault(c, [{"role": "system", "content": systems[c % prompts]}])
        if len(msgs) > 1:  # the previous answer, as a client would send it back (loadgen does not wait for it)
            msgs.append({"role": "assistant", "content": _text(rng, 20)})
        msgs.append({"role": "user", "content": _text(rng, 12) + "?"})
        return chat(list(msgs), user=f"conversation-{c}")

    makers.update(zipf=zipf, rag=rag, multiturn=multiturn)
    for i in range(requests):
        t += rng.expovariate(rate) * 1000
        if kind == "tenants":
            body = makers[rng.choice(("zipf", "rag", "multiturn"))](i)
            key = (tenants or ["tenant-0"])[rng.randrange(len(tenants or [0]))]
            body["_api_key"] = key  # replay turns it into the Authorization header, never into the body
        else:
            body = makers[kind](i)
        out.append(RecordedRequest(timestamp=t, endpoint="/v1/chat/completions", body=body))
    return out
