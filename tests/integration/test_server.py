"""A real worker process on 127.0.0.1: the openai SDK, SSE streaming, concurrency, errors, metrics."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.model

SYSTEM = "You are the support bot of a bakery. " + " ".join(
    f"Item {i} costs {i + 2} euros and is baked at {6 + i % 5} am." for i in range(30))


@pytest.fixture(scope="module")
def client(worker_url):
    return openai.OpenAI(base_url=worker_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_models_and_health(worker_url, model):
    assert model == "SmolLM2-135M-Instruct"
    assert httpx.get(worker_url + "/health").json()["status"] == "ok"


def test_sdk_chat_reports_cached_tokens_on_repeated_prefix(client, model):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does item 4 cost?"}]
    first = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0,
                                           extra_body={"cache_salt": "sdk-test"})
    again = client.chat.completions.create(model=model, messages=msgs[:1] + [{"role": "user", "content": "Hi?"}],
                                           max_tokens=8, temperature=0, extra_body={"cache_salt": "sdk-test"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached > 300 and cached % 16 == 0 and cached < again.usage.prompt_tokens
    assert first.choices[0].message.content and first.choices[0].finish_reason in ("stop", "length")
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_sdk_streaming_matches_non_streaming(client, model):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "When is item 7 baked?"}]
    kw = dict(model=model, messages=msgs, max_tokens=20, temperature=0, extra_body={"cache_salt": "stream-test"})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0  # the second request reused the first's prompt


def test_sdk_completions_stop_and_seed(client, model):
    out = client.completions.create(model=model, prompt="Count: 1, 2, 3, 4,", max_tokens=30, temperature=0,
                                    stop=[" 7"])
    assert out.choices[0].finish_reason == "stop" and " 7" not in out.choices[0].text
    assert "5" in out.choices[0].text
    a, b = (client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                      seed=1234).choices[0].text for _ in range(2))
    assert a == b
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="Count: 1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"], stream=True))
    assert streamed == out.choices[0].text


async def _stream(http: httpx.AsyncClient, body: dict,
                  first_text: asyncio.Event | None = None) -> tuple[list[dict], float]:
    """Stream a completion to its end; `first_text` is set when the first chunk with text arrives."""
    events = []
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    return events, time.monotonic()
                events.append(json.loads(line[6:]))
                if first_text is not None and events[-1]["choices"] and events[-1]["choices"][0]["text"]:
                    first_text.set()
    raise AssertionError("stream ended without [DONE]")


async def test_eight_concurrent_streams_and_short_overtakes_long(worker_url):
    async with httpx.AsyncClient(base_url=worker_url, timeout=300) as http:
        bodies = [{"prompt": f"Story {i}: the dragon", "max_tokens": 16, "temperature": 0} for i in range(8)]
        results = await asyncio.gather(*(_stream(http, b) for b in bodies))
        for events, _ in results:
            assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")

        # A long request is decoding; a short one sent later finishes first (iteration-level scheduling).
        long_decoding = asyncio.Event()
        long_task = asyncio.create_task(_stream(http, {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 200,
                                                       "temperature": 0}, long_decoding))
        await asyncio.wait_for(long_decoding.wait(), timeout=120)  # the long one has produced text: it decodes
        assert not long_task.done()
        short_events, short_done = await _stream(http, {"prompt": "Hi", "max_tokens": 4, "temperature": 0})
        long_events, long_done = await long_task
        assert short_done < long_done
        assert sum(1 for e in long_events if e["choices"] and e["choices"][0]["text"]) > 20


BAD = [
    ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
    ("/v1/chat/completions", b"{}", 400, None),
    ("/v1/chat/completions", b'{"messages": "hello"}', 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', 400,
     None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}', 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "n": 3}', 400, "unsupported_value"),
    ("/v1/chat/completions", b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}', 404,
     "model_not_found"),
    ("/v1/completions", b'{"prompt": [1, -5]}', 400, None),
    ("/v1/completions", b'{"prompt": ""}', 400, None),
    ("/v1/completions", json.dumps({"prompt": "word " * 9000}).encode(), 400, "context_length_exceeded"),
    ("/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 9000}).encode(), 400, "context_length_exceeded"),
    ("/v1/completions", b'{"prompt": "' + b"x" * (2 << 20) + b'"}', 413, "request_too_large"),
    ("/v1/nothing", b"{}", 404, "not_found"),
]


@pytest.mark.parametrize("path,body,status,code", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_openai_error(worker_url, path, body, status, code):
    r = httpx.post(worker_url + path, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    if code:
        assert err["code"] == code


def test_sdk_raises_typed_errors(client, model):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=0)


def test_metrics_count_prompt_and_cached_tokens(worker_url, client, model):
    def scrape():
        text = httpx.get(worker_url + "/metrics").text
        vals = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                vals[name] = float(value)
        return vals

    before = scrape()
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Metrics?"}]
    for _ in range(2):
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0,
                                           extra_body={"cache_salt": "metrics"})
    after = scrape()
    assert after["prefixroute_worker_cached_tokens_total"] - before.get("prefixroute_worker_cached_tokens_total", 0) \
        >= r.usage.prompt_tokens_details.cached_tokens > 0
    assert after["prefixroute_worker_prompt_tokens_total"] > before.get("prefixroute_worker_prompt_tokens_total", 0)
    assert after['prefixroute_worker_requests_total{endpoint="chat",status="200"}'] >= 2
    assert after["prefixroute_worker_cache_used_bytes"] > 0
    assert after["prefixroute_worker_cache_used_bytes"] <= after["prefixroute_worker_cache_capacity_bytes"]
    assert after["prefixroute_worker_busy_seconds_total"] > before.get("prefixroute_worker_busy_seconds_total", 0)


async def test_client_disconnect_frees_the_engine_slot(worker_url):
    async with httpx.AsyncClient(base_url=worker_url, timeout=60) as http:
        async with http.stream("POST", "/v1/completions", json={"prompt": "1, 2, 3,", "max_tokens": 2000,
                                                                  "temperature": 0, "stream": True}) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    break  # leave after the first chunk: the connection closes
        for _ in range(100):
            health = (await http.get("/health")).json()
            if health["running"] == 0 and health["waiting"] == 0:
                metrics = (await http.get("/metrics")).text
                assert 'prefixroute_worker_requests_total{endpoint="completions",status="499"}' in metrics
                return
            await asyncio.sleep(0.1)
    raise AssertionError("the abandoned request kept running")
