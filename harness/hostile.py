"""Hostile HTTP requests for the router and the worker, shared by tests/integration/test_hostile_input.py and
bench/hostile_input.py: hypothesis strategies that build raw requests (wrong types, random JSON, huge and deeply
nested bodies, compressed bodies and bombs, invalid UTF-8, garbage request heads, oversized headers, odd values
of the headers the servers read, bad Authorization, truncated bodies, slow senders), a raw-socket client that
sends one and reads what comes back, and the check of an answer (never a 5xx; every 4xx an OpenAI JSON error
body)."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st


@dataclass(frozen=True)
class Config:
    """The limits the servers under test were started with (the generators aim at both sides of each)."""

    api_key: str = "sk-hostile-test"
    max_body_bytes: int = 256 << 10
    max_header_bytes: int = 8190
    max_json_depth: int = 64
    max_tokens_limit: int = 64
    max_prompt_tokens: int = 2048
    body_timeout_s: float = 1.0


@dataclass(frozen=True)
class Case:
    kind: str
    head: bytes  # request line and headers, ending with the blank line
    body: bytes = b""
    mode: str = "full"  # full | truncated (Content-Length larger than the body, then close) | slow (part, then wait)
    auth: bool = True  # the router's tenant key goes in (unless the kind is about Authorization)
    # the answer it must get: {"router" | "worker" | "*": (status, error code or None)}; absent: any 1xx-4xx
    expect: dict[str, tuple[int, str | None]] = field(default_factory=dict, hash=False)


@dataclass
class Result:
    kind: str
    target: str
    status: int | None  # None: no answer (truncated by us, or the server closed)
    body: bytes = b""
    problem: str | None = None  # what is wrong with the answer, if anything
    seconds: float = 0.0
    request: bytes = b""  # the start of what was sent, to report a problem by


# ---- building requests ----------------------------------------------------------------------------------------

PATHS = ["/v1/chat/completions", "/v1/completions"]
CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
TEXT = {"prompt": "Say hi.", "max_tokens": 4}
FIELDS = ["model", "messages", "prompt", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "n",
          "stop", "stream", "stream_options", "user", "prompt_cache_key", "cache_salt", "metadata", "logprobs",
          "echo", "best_of", "frequency_penalty", "presence_penalty", "suffix"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def head(method: str, path: str, headers: list[tuple[str, str | bytes]], body_len: int | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    for k, v in headers:
        lines.append(k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()))
    if body_len is not None:
        lines.append(f"Content-Length: {body_len}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


def post(kind: str, path: str, body: bytes, headers: list[tuple[str, str | bytes]] | None = None,
         mode: str = "full", auth: bool = True, expect: dict[str, tuple[int, str | None]] | None = None) -> Case:
    hs = [("Content-Type", "application/json"), *(headers or [])]
    return Case(kind, head("POST", path, hs, len(body)), body, mode, auth, expect or {})


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def valid(draw) -> Case:
    path = draw(st.sampled_from(PATHS))
    body = dict(CHAT if "chat" in path else TEXT)
    body["max_tokens"] = draw(st.integers(1, 4))
    body["stream"] = draw(st.booleans())
    return post("valid", path, _dump(body), expect={"*": (200, None)})


@st.composite
def wrong_types(draw) -> Case:
    path = draw(st.sampled_from(PATHS))
    body = dict(CHAT if "chat" in path else TEXT)
    name = draw(st.sampled_from(FIELDS + ["max_tokens"]))
    value = draw(json_values)
    if name == "max_tokens" and (value is None or isinstance(value, int) and not isinstance(value, bool)):
        value = draw(st.sampled_from(["4", 4.5, [4], {"n": 4}, True]))  # a null would mean "to the context's end"
    body[name] = value
    return post("wrong_types", path, _dump(body))


@st.composite
def random_json(draw) -> Case:
    return post("random_json", draw(st.sampled_from(PATHS)), _dump(draw(json_values)))


@st.composite
def huge(draw, cfg: Config) -> Case:
    path = draw(st.sampled_from(PATHS))
    over = draw(st.booleans())
    n = draw(st.integers(cfg.max_body_bytes + 1, 4 * cfg.max_body_bytes) if over else
             st.integers(cfg.max_prompt_tokens * 8, cfg.max_body_bytes - 256))
    text = "lorem ipsum " * (n // 12)
    body = {"messages": [{"role": "user", "content": text}]} if "chat" in path else {"prompt": text}
    body["max_tokens"] = 4
    return post("huge", path, _dump(body),
                expect={"*": (413, "request_too_large") if over else (400, "context_length_exceeded")})


@st.composite
def deep(draw, cfg: Config) -> Case:
    path = draw(st.sampled_from(PATHS))
    depth = draw(st.integers(cfg.max_json_depth + 1, 5000) | st.integers(2, cfg.max_json_depth))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('[{"b":', "}]")]))
    per = 2 if opener.startswith("[{") else 1
    reps = max(1, depth // per)
    nested = opener * reps + "1" + closer * reps
    where = draw(st.sampled_from(["top", "messages", "prompt", "metadata"]))
    raw = nested if where == "top" else '{"%s": %s, "max_tokens": 4}' % (where, nested)
    levels = reps * per + (where != "top")
    code = "json_too_deep" if levels > cfg.max_json_depth else None
    return post("deep", path, raw.encode(), expect={"*": (400, code)})


@st.composite
def invalid_utf8(draw) -> Case:
    path = draw(st.sampled_from(PATHS))
    junk = draw(st.binary(min_size=1, max_size=16).filter(lambda b: _not_utf8(b)))
    field_ = b'"prompt"' if "completions" == path[-11:] else b'"messages"'
    shape = draw(st.sampled_from(["in_string", "raw", "key"]))
    if shape == "in_string":
        body = b'{' + field_ + b': "' + junk + b'", "max_tokens": 4}'
    elif shape == "key":
        body = b'{"' + junk + b'": 1, "max_tokens": 4}'
    else:
        body = junk
    return post("invalid_utf8", path, body, expect={"*": (400, "invalid_json")})


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@st.composite
def random_bytes(draw) -> Case:
    return post("random_bytes", draw(st.sampled_from(PATHS)), draw(st.binary(max_size=512)))


@st.composite
def oversized_headers(draw, cfg: Config) -> Case:
    shape = draw(st.sampled_from(["value", "name", "many", "url"]))
    size = draw(st.integers(cfg.max_header_bytes + 1, 4 * cfg.max_header_bytes))
    body = _dump(TEXT)
    if shape == "value":
        hs = [("X-Big", "v" * size)]
    elif shape == "name":
        hs = [("X-" + "n" * size, "1")]
    elif shape == "many":
        hs = [(f"X-H{i}", "1") for i in range(draw(st.integers(130, 400)))]
    else:
        return Case("oversized_headers", head("POST", "/v1/completions?" + "q" * size,
                                              [("Content-Type", "application/json")], len(body)), body,
                    expect={"*": (431, "headers_too_large")})
    return post("oversized_headers", "/v1/completions", body, hs, expect={"*": (431, "headers_too_large")})


@st.composite
def bad_auth(draw) -> Case:
    fixed = st.sampled_from([None, b"Bearer", b"Bearer ", b"Basic c2stdGVzdA==", b"bearer sk-hostile-test",
                             b"Bearer sk-hostile-tesT", b"Bearer \xff\xfe\xc3(", "Bearer clé".encode()])
    # random bytes: control characters make the head unparseable (400), anything else is a wrong key (401)
    anything = (st.binary(min_size=1, max_size=64).map(lambda b: b"Bearer " + b)
                | st.text(min_size=1, max_size=64).map(lambda t: ("Bearer " + t).encode("utf-8", "surrogatepass")))
    is_fixed = draw(st.booleans())
    value = draw(fixed) if is_fixed else draw(anything).replace(b"\r", b"").replace(b"\n", b"")
    path = draw(st.sampled_from(PATHS + ["/v1/models"]))
    hs = [] if value is None else [("Authorization", value)]
    # the worker has no API keys
    expect = {"router": (401, "invalid_api_key"), "worker": (200, None)} if is_fixed else {}
    if path == "/v1/models":
        return Case("bad_auth", head("GET", path, hs, None), auth=False, expect=expect)
    return post("bad_auth", path, _dump(CHAT if "chat" in path else TEXT), hs, auth=False, expect=expect)


ODD_HEADERS = ["x-session-id", "x-prefix-version", "x-prefixroute-key", "x-prefixroute-tenant",
               "x-prefixroute-expected-tokens", "content-type", "accept-encoding", "content-encoding", "expect",
               "transfer-encoding", "x-admin-key", "accept"]


@st.composite
def odd_headers(draw) -> Case:
    """Headers the router or worker read (session, version, routing tags, encodings) with arbitrary values."""
    path = draw(st.sampled_from(PATHS))
    names = draw(st.lists(st.sampled_from(ODD_HEADERS), min_size=1, max_size=4, unique=True))
    fixed = st.sampled_from([b"gzip", b"deflate", b"br", b"chunked", b"100-continue", b"-1", b"1e309",
                             b"\xff\xfe\x80"])
    values = (st.binary(min_size=0, max_size=40) | st.text(max_size=40).map(
        lambda t: t.encode("utf-8", "surrogatepass")) | fixed)
    hs = [(n, draw(values).replace(b"\r", b"").replace(b"\n", b"")) for n in names]
    return post("odd_headers", path, _dump(CHAT if "chat" in path else TEXT), hs)


@st.composite
def compressed(draw, cfg: Config) -> Case:
    """A gzip or deflate body: a bomb (small on the wire, past max_body_bytes inflated), garbage, or a fine one."""
    import zlib

    path = draw(st.sampled_from(PATHS))
    enc = draw(st.sampled_from(["gzip", "deflate"]))
    shape = draw(st.sampled_from(["bomb", "garbage", "fine"]))
    if shape == "garbage":
        return post("compressed", path, draw(st.binary(min_size=1, max_size=200)), [("Content-Encoding", enc)])
    plain = (b'{"prompt": "' + b"a" * (cfg.max_body_bytes * draw(st.integers(2, 64))) + b'"}' if shape == "bomb"
             else _dump(CHAT if "chat" in path else TEXT))
    c = zlib.compressobj(9, zlib.DEFLATED, 31 if enc == "gzip" else 15)
    body = c.compress(plain) + c.flush()
    expect = {"*": (413, "request_too_large")} if shape == "bomb" else {}
    return post("compressed", path, body, [("Content-Encoding", enc)], expect=expect)


@st.composite
def bad_http(draw) -> Case:
    shape = draw(st.sampled_from(["method", "path", "line", "content_length", "chunked", "version"]))
    body = _dump(TEXT)
    if shape == "method":
        m = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO", "G\x01T"]))
        return Case("bad_http", head(m, draw(st.sampled_from(PATHS)), [], len(body)), body)
    if shape == "path":
        p = draw(st.sampled_from(["/", "/v1", "/v1/chat/completions/x", "/%00", "/../etc/passwd", "/v1/completions%ff",
                                  "//v1/completions", "/admin/workers", "/admin/stats", "/metrics", "/openapi.json"]))
        return Case("bad_http", head("POST", p, [], len(body)), body)
    if shape == "line":
        return Case("bad_http", draw(st.binary(min_size=1, max_size=200)) + b"\r\n\r\n")
    if shape == "content_length":
        v = draw(st.sampled_from(["abc", "-1", "1e3", "99999999999999999999999", " 5", "5, 5"]))
        return Case("bad_http", head("POST", "/v1/completions", [("Content-Length", v)], None), body)
    if shape == "chunked":
        chunks = draw(st.sampled_from([b"zz\r\nabc\r\n0\r\n\r\n", b"5\r\nab\r\n", b"-1\r\n\r\n",
                                       b"4\r\n{\"a\"\r\n0\r\n\r\n", b"ffffffffffffffff\r\n"]))
        return Case("bad_http", head("POST", "/v1/completions", [("Transfer-Encoding", "chunked"),
                                                                  ("Content-Type", "application/json")], None),
                    chunks)
    v = draw(st.sampled_from(["HTTP/2.0", "HTTP/0.9", "HTTP/1.1x", "HTTPS/1.1"]))
    return Case("bad_http", f"POST /v1/completions {v}\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode(),
                body)


@st.composite
def token_limits(draw, cfg: Config) -> Case:
    path = draw(st.sampled_from(PATHS))
    body = dict(CHAT if "chat" in path else TEXT)
    name = draw(st.sampled_from(["max_tokens", "max_completion_tokens"] if "chat" in path else ["max_tokens"]))
    body[name] = draw(st.integers(cfg.max_tokens_limit + 1, 2**40))
    return post("token_limits", path, _dump(body), expect={"*": (400, "max_tokens_exceeded")})


@st.composite
def truncated(draw) -> Case:
    path = draw(st.sampled_from(PATHS))
    body = _dump(CHAT if "chat" in path else TEXT)
    cut = draw(st.integers(0, len(body)))
    extra = draw(st.integers(1, 1 << 20))
    return Case("truncated", head("POST", path, [("Content-Type", "application/json")], cut + extra),
                body[:cut], "truncated")


@st.composite
def slow(draw) -> Case:
    """Part of the body (408 body_timeout), or part of the head, even nothing but blank lines (408
    header_timeout), then nothing more."""
    path = draw(st.sampled_from(PATHS))
    body = _dump(CHAT if "chat" in path else TEXT)
    full = head("POST", path, [("Content-Type", "application/json")], len(body))
    if draw(st.booleans()):
        return Case("slow", full, body[:draw(st.integers(0, len(body) - 1))], "slow",
                    expect={"*": (408, "body_timeout")})
    part = draw(st.sampled_from([b"", b"\r\n", b"\r\n\r\n"])) + full[:draw(st.integers(0, len(full) - 3))]
    return Case("slow_head", part, b"", "slow", auth=False, expect={"*": (408, "header_timeout")})


def cases(cfg: Config) -> st.SearchStrategy[Case]:
    """Every kind but slow senders (draw_cases adds those, few: each holds a connection for body_timeout_s)."""
    return st.one_of(valid(), wrong_types(), random_json(), huge(cfg), deep(cfg), invalid_utf8(), random_bytes(),
                     oversized_headers(cfg), bad_auth(), bad_http(), token_limits(cfg), truncated(), odd_headers(),
                     compressed(cfg))


def _draw(strategy: st.SearchStrategy[Case], n: int, seed: int | None) -> list[Case]:
    out: list[Case] = []
    if n <= 0:
        return out

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate], derandomize=seed is None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(case: Case) -> None:
        out.append(case)

    (hypothesis_seed(seed)(collect) if seed is not None else collect)()
    return out[:n]


def regressions() -> list[Case]:
    """Requests that once got a 500 or a plain-text error, sent in every run."""
    text = _dump(TEXT)
    return [
        post("odd_headers", "/v1/completions", text, [("x-session-id", b"\xff\xfe\x80")], expect={"*": (200, None)}),
        post("bad_auth", "/v1/completions", text, [("Authorization", b"Bearer \xff\xfe")], auth=False,
             expect={"router": (401, "invalid_api_key"), "worker": (200, None)}),
        post("compressed", "/v1/completions", b"not gzip", [("Content-Encoding", "gzip")],
             expect={"*": (400, "invalid_body")}),
        post("odd_headers", "/v1/completions", text, [("Expect", "teapot")], expect={"*": (417, "expectation_failed")}),
        post("odd_headers", "/v1/completions", text, [("Expect", b"\xd3,")], expect={"*": (417, "expectation_failed")}),
        Case("slow_head", b"\r\r\n\r\n", mode="slow", auth=False, expect={"*": (408, "header_timeout")}),
    ]


def draw_cases(cfg: Config, n: int, seed: int | None = None, slow_share: float = 0.01) -> list[Case]:
    """`n` cases: the regressions, then cases drawn by hypothesis (generation only: no shrinking, no example
    database), `slow_share` of them slow senders, spread through the list."""
    n_slow = round(n * slow_share)
    fixed = [c for c in regressions() for _ in (0, 1)]  # to each of two targets (run_all alternates them)
    batch = fixed[:n] + _draw(cases(cfg), n - n_slow - len(fixed), seed)
    slow_ones = _draw(slow(), n_slow, seed)
    step = max(1, len(batch) // max(1, n_slow))
    for i, c in enumerate(slow_ones):
        batch.insert(min(len(batch), i * (step + 1)), c)
    return batch


# ---- sending and checking -------------------------------------------------------------------------------------


def _with_auth(case: Case, api_key: str | None) -> bytes:
    if not case.auth or api_key is None:
        return case.head
    i = case.head.find(b"\r\n")
    if i < 0:
        return case.head
    return case.head[:i] + f"\r\nAuthorization: Bearer {api_key}".encode() + case.head[i:]


def _read_all(sock: socket.socket, deadline: float) -> bytes:
    chunks = []
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def send(host: str, port: int, case: Case, api_key: str | None, timeout: float = 15.0) -> tuple[int | None, bytes]:
    """Send one case on a fresh connection (Connection: close) and return (status, body) of what came back."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((host, port), timeout=5) as sock:
        try:
            sock.sendall(_with_auth(case, api_key) + case.body)
        except OSError:
            pass  # the server may answer (413, 431) and close before reading everything
        if case.mode == "truncated":
            return None, b""
        raw = _read_all(sock, deadline)
    return _parse(raw)


def _parse(raw: bytes) -> tuple[int | None, bytes]:
    if not raw.startswith(b"HTTP/"):  # aiohttp answers an HTTP/0.9 or 2.0 request line in its version
        return None, raw
    head_, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head_.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None, raw
    if 100 <= status < 200 and body.startswith(b"HTTP/"):  # 100 Continue, then the answer
        return _parse(body)
    if b"transfer-encoding: chunked" in head_.lower():
        body = _unchunk(body)
    return status, body


def _unchunk(data: bytes) -> bytes:
    out, i = [], 0
    while i < len(data):
        j = data.find(b"\r\n", i)
        if j < 0:
            break
        try:
            n = int(data[i:j].split(b";")[0], 16)
        except ValueError:
            break
        if n == 0:
            break
        out.append(data[j + 2:j + 2 + n])
        i = j + 2 + n + 2
    return b"".join(out)


def problem(status: int | None, body: bytes, case: Case, target: str = "*") -> str | None:
    """What is wrong with an answer, or None: no 5xx, every 4xx an OpenAI error body, no silence except where
    the client itself cut the request, and the expected status and error code where the case names one."""
    if status is None:
        return None if case.mode == "truncated" else "no HTTP answer"
    if status >= 500:
        return f"{status} answer"
    err = None
    if status >= 400 and not case.head.startswith(b"HEAD "):  # an answer to HEAD has no body
        try:
            err = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            return f"{status} without an OpenAI JSON error body"
        if not isinstance(err, dict) or not isinstance(err.get("message"), str) or not isinstance(err.get("type"),
                                                                                                     str):
            return f"{status} error body lacks message/type"
    want = case.expect.get(target, case.expect.get("*"))
    if want is not None:
        if status != want[0]:
            return f"{status} answer, expected {want[0]}"
        if want[1] is not None and (err or {}).get("code") != want[1]:
            return f"error code {(err or {}).get('code')!r}, expected {want[1]!r}"
    return None


@dataclass
class Target:
    name: str
    url: str
    api_key: str | None = None

    @property
    def addr(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)


def run_one(target: Target, case: Case, timeout: float = 15.0) -> Result:
    t0 = time.monotonic()
    try:
        status, body = send(*target.addr, case, target.api_key, timeout)
    except OSError as exc:
        return Result(case.kind, target.name, None, b"", f"connection failed ({type(exc).__name__})",
                      time.monotonic() - t0, case.head[:300])
    return Result(case.kind, target.name, status, body[:2048], problem(status, body, case, target.name),
                  time.monotonic() - t0, case.head[:300])


def run_all(targets: list[Target], batch: list[Case], threads: int = 4, timeout: float = 15.0) -> list[Result]:
    """Each case against each target in turn (case i goes to target i mod len(targets)), `threads` at once."""
    jobs = [(targets[i % len(targets)], c) for i, c in enumerate(batch)]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda j: run_one(j[0], j[1], timeout), jobs))


@dataclass
class Summary:
    requests: int = 0
    by_kind: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    by_kind_status: dict[str, Counter] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, results: list[Result]) -> Summary:
        s = cls(len(results))
        for r in results:
            st_ = "none" if r.status is None else str(r.status)
            s.by_kind[r.kind] += 1
            s.by_status[st_] += 1
            s.by_kind_status.setdefault(r.kind, Counter())[st_] += 1
            if r.problem:
                s.problems.append(f"{r.target} {r.kind}: {r.problem}: {r.body[:200]!r}; request {r.request!r}")
        return s

    @property
    def server_errors(self) -> int:
        return sum(n for st_, n in self.by_status.items() if st_ != "none" and int(st_) >= 500)
