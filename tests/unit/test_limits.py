"""Request limits (protocol.limits) on a real aiohttp server started with JSONErrorRunner: JSON depth (400
json_too_deep), body size (413, a gzip bomb too), header size (431 headers_too_large, as JSON), a slow body (408
body_timeout), a garbage request head (400, as JSON), a broken gzip body (400), an unknown Expect (417, as
JSON), max_tokens; the depth scan against a reference on hypothesis-made JSON;
the settings and flags of each limit; the OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import APIError
from protocol.http import openai_app, parse_model, read_json
from protocol.limits import (
    JSONErrorRunner,
    Limits,
    check_json_depth,
    check_max_tokens,
    header_limits,
    json_depth,
    value_depth,
)
from protocol.openai import ChatCompletionRequest, CompletionRequest
from protocol.openapi import openapi_document

# The server fixture and the tests share one event loop (fixtures default to the session loop here).
on_session_loop = pytest.mark.asyncio(loop_scope="session")

def reference_depth(v) -> int:
    if isinstance(v, list):
        return 1 + max((reference_depth(x) for x in v), default=0)
    if isinstance(v, dict):
        return 1 + max((reference_depth(x) for x in v.values()), default=0)
    return 0


tricky_text = st.text(alphabet=st.sampled_from('[]{}"\\ab\n\u00e9'), max_size=12)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | tricky_text,
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(tricky_text, c, max_size=3),
                           max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans(), st.sampled_from([1, 2, 3, 5, 64]))
def test_json_depth_matches_a_walk_of_the_parsed_value(value, ascii_only, chunk):
    raw = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_depth(raw) == reference_depth(value)
    assert json_depth(raw, chunk=chunk) == reference_depth(value)  # state carried across chunk boundaries


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(1, 6), st.integers(1, 40))
def test_value_depth_matches_the_reference(value, max_depth, budget):
    want = reference_depth(value)
    got = value_depth(value, max_depth, budget)
    if got is not None:  # None: more containers than the budget (the caller scans the bytes instead)
        assert got == want if want <= max_depth else got > max_depth
    assert value_depth(value, 10_000) == want  # within the default budget: always measured
    raw = json.dumps(value).encode() + b" " * 5000  # past the size at which the walk replaces the scan
    for limit in (max_depth, want, max(1, want - 1)):
        with_value = without = None
        try:
            check_json_depth(raw, limit, value)
        except APIError as e:
            with_value = e.code
        try:
            check_json_depth(raw, limit)
        except APIError as e:
            without = e.code
        assert with_value == without == ("json_too_deep" if want > limit else None)


def test_value_depth_falls_back_to_the_scan_for_wide_bodies():
    wide = [[1]] * 2000  # 8 KB
    assert value_depth(wide, 64) is None
    check_json_depth(json.dumps(wide).encode(), 64, wide)
    with pytest.raises(APIError):
        deep = [[1]] * 2000 + [json.loads("[" * 70 + "]" * 70)]
        check_json_depth(json.dumps(deep).encode(), 64, deep)


def test_json_depth_ignores_brackets_in_strings_and_escapes():
    assert json_depth(b'{"a": "[[[[{{{{", "b": ["\\"]]]]", 1]}') == 2
    assert json_depth(b'"[[["') == 0
    assert json_depth(b'["\\\\", ["\\\\\\"]"]]') == 2  # escaped backslashes, then an escaped quote
    assert json_depth(b"[" * 70 + b"]" * 70) == 70
    check_json_depth(b"[" * 64 + b"]" * 64, 64)
    with pytest.raises(APIError) as e:
        check_json_depth(b"[" * 65 + b"]" * 65, 64)
    assert (e.value.status, e.value.code) == (400, "json_too_deep")
    # many brackets, shallow: passes (the scan runs, and finds depth 2)
    check_json_depth(b"[" + b"[1]," * 500 + b"[1]]", 64)


def test_max_tokens_limit_names_the_field_sent():
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                 "max_completion_tokens": 65})
    with pytest.raises(APIError) as e:
        check_max_tokens(chat, 64)
    assert (e.value.status, e.value.param, e.value.code) == (400, "max_tokens", "max_tokens_exceeded")
    assert "max_completion_tokens" in e.value.message
    check_max_tokens(chat, 65)
    check_max_tokens(chat, None)
    text = CompletionRequest.model_validate({"prompt": "x", "max_tokens": 10**9})
    with pytest.raises(APIError):
        check_max_tokens(text, 64)


class EchoSurface:
    """The smallest OpenAI surface: completions parse and echo their body, the rest answer plainly."""

    async def chat_completions(self, request):
        return web.json_response(parse_model(ChatCompletionRequest, await read_json(request)).model_dump())

    async def completions(self, request):
        return web.json_response(await read_json(request))

    async def models(self, request):
        return web.json_response({"object": "list", "data": []})

    async def health(self, request):
        return web.json_response({"status": "ok"})

    async def prometheus(self, request):
        return web.Response(text="")


@pytest.fixture
async def server():
    app = openai_app(EchoSurface(), 4096, Limits(max_json_depth=8, body_timeout_s=0.5, max_tokens_limit=16))
    runner = JSONErrorRunner(app, access_log=None, handler_cancellation=True, head_timeout_s=0.5,
                             **header_limits(1024))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield port
    await runner.cleanup()


async def raw(port: int, data: bytes, pause_s: float = 0.0, more: bytes = b"") -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if pause_s:
        await asyncio.sleep(pause_s)
        writer.write(more)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def request(body: bytes, extra: bytes = b"", path: bytes = b"/v1/completions", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            + extra + b"Content-Length: " + str(n).encode() + b"\r\n\r\n" + body)


@on_session_loop
async def test_depth_size_and_a_normal_body(server):
    status, body = await raw(server, request(b'{"a": [[[1]]]}'))
    assert (status, body) == (200, {"a": [[[1]]]})
    status, body = await raw(server, request(b'{"a":' + b"[" * 8 + b"]" * 8 + b"}"))
    assert (status, body["error"]["code"]) == (400, "json_too_deep")
    status, body = await raw(server, request(b"[" * 2000 + b"]" * 2000))  # past orjson's own cap too
    assert (status, body["error"]["code"]) == (400, "json_too_deep")
    status, body = await raw(server, request(b'{"a": "' + b"x" * 5000 + b'"}'))
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    status, body = await raw(server, request(b'{"a": "\xff\xfe"}'))
    assert (status, body["error"]["code"]) == (400, "invalid_json")


@on_session_loop
async def test_oversized_header_line_and_field_get_json_431(server):
    for extra, path in ((b"X-Big: " + b"v" * 1100 + b"\r\n", b"/v1/completions"),
                        (b"X-" + b"n" * 1100 + b": 1\r\n", b"/v1/completions"),
                        (b"", b"/v1/completions?" + b"q" * 1100)):
        status, body = await raw(server, request(b"{}", extra, path))
        assert status == 431
        assert body["error"]["code"] == "headers_too_large" and body["error"]["type"] == "invalid_request_error"
    status, body = await raw(server, request(b'{"a": 1}', b"X-Fine: " + b"v" * 900 + b"\r\n"))
    assert status == 200


@on_session_loop
async def test_garbage_request_head_gets_json_400(server):
    for junk in (b"\x16\x03\x01\x00\xa5\x01\x00\x00\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                 b"POST /v1/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n"):
        status, body = await raw(server, junk)
        assert status == 400 and body["error"]["code"] == "invalid_request", junk


@on_session_loop
async def test_compressed_bodies_unknown_expect_and_a_bomb_get_json_errors(server):
    import gzip

    status, body = await raw(server, request(b"not gzip at all", b"Content-Encoding: gzip\r\n"))
    assert (status, body["error"]["code"]) == (400, "invalid_body")
    bomb = gzip.compress(b'{"a": "' + b"a" * (1 << 20) + b'"}')  # 1 KiB on the wire, 1 MiB inflated
    status, body = await raw(server, request(bomb, b"Content-Encoding: gzip\r\n"))
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    status, body = await raw(server, request(gzip.compress(b'{"a": 2}'), b"Content-Encoding: gzip\r\n"))
    assert (status, body) == (200, {"a": 2})
    status, body = await raw(server, request(b'{"a": 1}', b"Expect: teapot\r\n"))
    assert (status, body["error"]["code"]) == (417, "expectation_failed")
    status, body = await raw(server, request(b'{"a": 1}', b"Expect: \xd3,\r\n"))  # aiohttp alone: a 500
    assert (status, body["error"]["code"]) == (417, "expectation_failed")


@on_session_loop
async def test_slow_head_or_body_gets_408_and_a_prompt_one_is_served(server):
    full = b'{"a": 1}'
    status, body = await raw(server, request(full[:3], length=len(full)))
    assert (status, body["error"]["code"]) == (408, "body_timeout")
    status, body = await raw(server, request(full[:3], length=len(full)), 0.1, full[3:])
    assert (status, body) == (200, {"a": 1})
    whole = request(full)
    for part in (b"", b"\r\n\r\n", whole[:20], whole[:whole.index(b"\r\n\r\n") + 2]):  # a slow head, or none
        status, body = await raw(server, part)
        assert (status, body["error"]["code"]) == (408, "header_timeout"), part
    status, body = await raw(server, whole[:20], 0.2, whole[20:])  # slow but in time
    assert (status, body) == (200, {"a": 1})


@on_session_loop
async def test_openapi_document_is_served_and_built_from_the_models(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    doc = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert doc == openapi_document()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
    schemas = doc["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["required"] == ["messages"]
    assert set(schemas["ChatCompletionRequest"]["properties"]) >= set(ChatCompletionRequest.model_fields)
    assert set(schemas["CompletionRequest"]["properties"]) >= set(CompletionRequest.model_fields)
    assert schemas["ErrorBody"]["properties"]["error"] == {"$ref": "#/components/schemas/ErrorDetail"}
    refs = re.findall(r'"#/components/schemas/([A-Za-z]+)"', json.dumps(doc))
    assert refs and set(refs) <= set(schemas)  # every reference resolves
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    assert chat["responses"]["431"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")


def test_limit_settings_and_flags():
    from router.settings import parse_args as router_args
    from worker.settings import parse_args as worker_args

    r = router_args(["--max-json-depth", "10", "--max-header-bytes", "4096", "--body-timeout-s", "2",
                     "--max-prompt-tokens", "100", "--max-tokens-limit", "50", "--request-time-limit-s", "30"])
    assert (r.max_json_depth, r.max_header_bytes, r.body_timeout_s, r.max_prompt_tokens, r.max_tokens_limit,
            r.request_time_limit_s) == (10, 4096, 2.0, 100, 50, 30.0)
    assert Limits.of(r) == Limits(10, 2.0, 50)
    w = worker_args(["--max-json-depth", "12", "--max-header-bytes", "2048", "--body-timeout-s", "3",
                     "--max-prompt-tokens", "99", "--max-tokens-limit", "7"])
    assert (w.max_json_depth, w.max_header_bytes, w.body_timeout_s, w.max_prompt_tokens, w.max_tokens_limit) == \
        (12, 2048, 3.0, 99, 7)
    d = router_args([])
    assert (d.max_json_depth, d.max_header_bytes, d.max_prompt_tokens, d.max_tokens_limit,
            d.request_time_limit_s) == (64, 8190, None, None, None)
