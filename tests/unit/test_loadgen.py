"""loadgen: workload parsing with line-numbered errors, trace prompts that keep the sharing structure under the
real tokenizer, statistics on a case with known answers, synthetic workloads, CLI argument errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time

import pytest

from loadgen.__main__ import parse
from loadgen.replay import Job, Result, replay
from loadgen.report import markdown, percentile, summarize
from loadgen.synth import generate
from loadgen.traces import MooncakeLine, PromptBuilder, TraceError, detect_format, read_mooncake, read_requests
from protocol.modelfiles import default_model_path, load_tokenizer


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join(json.dumps(x) + "\n" if not isinstance(x, str) else x + "\n" for x in lines))
    return p


GOOD = {"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]}


@pytest.mark.parametrize("bad,message", [
    ("{not json", "not JSON"),
    ({**GOOD, "hash_ids": [0]}, "hash_ids has 1 ids but input_length 1000 needs 2"),
    ({**GOOD, "input_length": "1000"}, "input_length"),
    ({k: v for k, v in GOOD.items() if k != "output_length"}, "output_length"),
    ({**GOOD, "timestamp": -5}, "timestamp"),
])
def test_malformed_mooncake_lines_name_file_and_line(tmp_path, bad, message):
    p = write(tmp_path, "t.jsonl", [GOOD, GOOD, bad])
    with pytest.raises(TraceError) as exc:
        read_mooncake(p)
    assert "t.jsonl:3:" in str(exc.value) and message in str(exc.value)


def test_formats_are_detected_and_parsed(tmp_path):
    m = write(tmp_path, "m.jsonl", [GOOD, {**GOOD, "timestamp": 7}])
    r = write(tmp_path, "r.jsonl", [{"timestamp": 1.5, "endpoint": "/v1/completions", "body": {"prompt": "x"}}])
    assert detect_format(m) == "mooncake" and detect_format(r) == "requests"
    assert [x.timestamp for x in read_mooncake(m)] == [0, 7] and len(read_mooncake(m, limit=1)) == 1
    assert read_requests(r)[0].body == {"prompt": "x"}
    bad = write(tmp_path, "b.jsonl", [{"timestamp": 1, "endpoint": "/v1/nope", "body": {}}])
    with pytest.raises(TraceError, match="b.jsonl:1: endpoint"):
        read_requests(bad)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


@pytest.mark.parametrize("block_tokens", [16, 512])
def test_equal_hash_ids_give_equal_token_blocks(tokenizer, block_tokens):
    b = PromptBuilder(tokenizer, block_tokens)
    lines = [MooncakeLine(timestamp=0, input_length=1300, output_length=1, hash_ids=[0, 1, 2]),
             MooncakeLine(timestamp=1, input_length=1500, output_length=1, hash_ids=[0, 1, 9]),
             MooncakeLine(timestamp=2, input_length=600, output_length=1, hash_ids=[5, 1])]
    toks = [tokenizer(b.prompt(x), add_special_tokens=False).input_ids for x in lines]
    for x, t in zip(lines, toks):
        assert len(t) == b.scaled_length(x.input_length)  # exactly the (scaled) trace length
    n = block_tokens
    assert toks[0][: 2 * n] == toks[1][: 2 * n]  # shared ids 0, 1
    assert toks[0][2 * n: 3 * n] != toks[1][2 * n: 3 * n]  # 2 vs 9
    # same id at the same position, same tokens (block 1 of line 2 is cut short by its input length)
    assert toks[2][:n] != toks[0][:n] and toks[2][n:] == toks[0][n: len(toks[2])]
    assert PromptBuilder(tokenizer, block_tokens).prompt(lines[0]) == b.prompt(lines[0])  # deterministic


def test_statistics_on_a_known_case():
    rs = []
    for i in range(10):
        rs.append(Result(i, i * 0.1, status=200, ttft_s=(i + 1) / 10, e2e_s=(i + 1), itls=[0.01 * (i + 1)],
                         prompt_tokens=100, cached_tokens=50 if i < 4 else 0, completion_tokens=10,
                         worker="a" if i < 6 else "b"))
    rs.append(Result(10, 1.0, status=503, error="overloaded"))
    rs.append(Result(11, 1.0, status=429, error="full", retry_after="1"))
    rs.append(Result(12, 1.0, status=429, error="full"))
    s = summarize(rs, wall_s=5.0)
    assert (s["requests"], s["ok"], s["errors"], s["errors_by_status"]) == (13, 10, 1, {"503": 1})
    assert (s["refused"], s["refused_without_retry_after"]) == (2, 1)  # 429s are refusals, not errors
    assert s["cached_token_ratio"] == pytest.approx(200 / 1000)
    assert s["ttft_p50_s"] == pytest.approx(0.5) and s["ttft_p99_s"] == pytest.approx(1.0)
    assert s["itl_p50_s"] == pytest.approx(0.05) and s["e2e_p90_s"] == pytest.approx(9)
    assert s["max_mean_load"] == pytest.approx(6 / 5)
    assert s["per_worker"]["a"]["request_share"] == pytest.approx(0.6)
    assert s["per_worker"]["a"]["cached_token_ratio"] == pytest.approx(200 / 600)
    assert s["throughput_rps"] == pytest.approx(2.0)
    assert percentile([], 50) is None and percentile([3, 1, 2], 50) == 2


def _served(workers: list[str]) -> list[Result]:
    return [Result(i, 0.0, status=200, ttft_s=0.1, e2e_s=0.2, prompt_tokens=10, completion_tokens=1, worker=w)
            for i, w in enumerate(workers)]


def test_max_mean_load_counts_idle_workers_of_the_fleet():
    one = _served(["w0"] * 8)  # a policy that sends everything to one worker
    assert summarize(one, 1.0, workers=4)["max_mean_load"] == pytest.approx(4.0)
    assert summarize(one, 1.0)["max_mean_load"] == pytest.approx(1.0)  # fleet unknown: only workers seen
    s = summarize(_served(["w0"] * 6 + ["w1"] * 2), 1.0, workers=4)
    assert s["max_mean_load"] == pytest.approx(6 / 2) and s["workers_counted"] == 4
    assert set(s["per_worker"]) == {"w0", "w1"}
    # a worker that joined mid-run is counted even beyond the given fleet size
    assert summarize(_served(["a", "b", "c"]), 1.0, workers=2)["max_mean_load"] == pytest.approx(1.0)


@pytest.mark.parametrize("workers", [None, 4])
def test_load_is_unknown_when_requests_do_not_name_their_worker(workers):
    for names in (["", "", ""], ["w0", "", "w1"]):  # no header at all (another router), or some without it
        s = summarize(_served(names), 1.0, workers=workers)
        assert s["max_mean_load"] is None and s["per_worker"] is None
        assert s["requests_without_worker"] == names.count("")
        assert json.loads(json.dumps(s))["max_mean_load"] is None
        row = markdown({"run": s}).splitlines()[2].split("|")
        assert row[9].strip() == "unknown"


def test_workers_option_reaches_the_report():
    for cmd in (["replay", "t.jsonl", "--url", "http://x"], ["compare", "t.jsonl", "--url", "a=http://x"],
                ["synth", "zipf", "--url", "http://x"]):
        assert parse([*cmd, "--workers", "4"]).workers == 4
        assert parse(cmd).workers is None


@contextlib.asynccontextmanager
async def completions_server():
    """A streaming /v1/completions on 127.0.0.1 that names no worker: one token, its usage, [DONE]."""
    from aiohttp import web

    async def complete(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"index":0,"text":"x"}]}\n\n')
        await resp.write(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def test_a_response_without_the_worker_header_names_no_worker():
    """Straight to a server that sends no `x-prefixroute-worker` (a worker, another router): the worker is "",
    not the URL, so the report cannot mistake the whole run for one worker's."""
    async def go() -> list[Result]:
        async with completions_server() as url:
            jobs = [Job(0.0, "/v1/completions", {"prompt": "hi", "max_tokens": 1}) for _ in range(3)]
            return await replay(url, jobs, concurrency=1, timeout_s=30)

    rs = asyncio.run(go())
    assert [r.ok for r in rs] == [True] * 3 and {r.worker for r in rs} == {""}
    s = summarize(rs, 1.0, workers=2)
    assert s["max_mean_load"] is None and s["requests_without_worker"] == 3


def test_an_open_loop_client_that_falls_behind_reports_its_lag():
    """The client's loop stalls for 0.3 s (a busy CPU): requests due meanwhile go out late. Their TTFT counts from
    the send, so the summary reports the lag; a closed-loop run has no schedule and reports none."""
    async def go(concurrency: int | None) -> list[Result]:
        async with completions_server() as url:
            jobs = [Job(0.02 * i, "/v1/completions", {"prompt": "hi", "max_tokens": 1}) for i in range(10)]
            asyncio.get_running_loop().call_later(0.05, time.sleep, 0.3)
            return await replay(url, jobs, concurrency=concurrency, timeout_s=30)

    rs = asyncio.run(go(None))
    s = summarize(rs, 1.0)
    assert s["ok"] == 10 and 0.2 < s["send_late_max_s"] < 1.0 and s["send_late_p50_s"] > 0.05
    assert max(r.late_s for r in rs) == s["send_late_max_s"]
    closed = summarize(asyncio.run(go(2)), 1.0)
    assert closed["send_late_max_s"] is None and closed["send_late_p99_s"] is None


def test_synthetic_workloads_are_deterministic_and_shaped():
    a = generate("zipf", 50, 10.0, seed=3)
    assert [r.model_dump() for r in a] == [r.model_dump() for r in generate("zipf", 50, 10.0, seed=3)]
    assert all(x.timestamp < y.timestamp for x, y in zip(a, a[1:]))
    systems = [r.body["messages"][0]["content"] for r in a]
    assert len(set(systems)) < 20  # popular prompts repeat
    turns = generate("multiturn", 60, 10.0, seed=1, turns=5)
    by_user: dict[str, list[int]] = {}
    for r in turns:
        by_user.setdefault(r.body["user"], []).append(len(r.body["messages"]))
    assert any(lens == sorted(lens) and len(lens) > 1 and lens[-1] > lens[0] for lens in by_user.values())
    t = generate("tenants", 20, 5.0, tenants=["k1", "k2"])
    assert {r.body["_api_key"] for r in t} <= {"k1", "k2"}
    with pytest.raises(ValueError):
        generate("nope", 1, 1.0)


@pytest.mark.parametrize("argv", [["replay", "t.jsonl"], ["replay", "t.jsonl", "--url", "a", "--url", "b"],
                                  ["replay", "t.jsonl", "--url", "http://127.0.0.1:1", "--speedup", "0"],
                                  ["compare", "t.jsonl", "--url", "http://x"]])
def test_bad_arguments_exit_2(argv):
    r = subprocess.run([sys.executable, "-m", "loadgen", *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_malformed_trace_exits_2_with_the_line(tmp_path):
    p = write(tmp_path, "t.jsonl", [GOOD, {**GOOD, "hash_ids": []}])
    r = subprocess.run([sys.executable, "-m", "loadgen", "replay", str(p), "--url", "http://127.0.0.1:9",
                        "--model", "m"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "t.jsonl:2:" in r.stderr and "Traceback" not in r.stderr


def test_longdoc_and_hotdoc_shapes_have_the_sharing_they_promise(tmp_path):
    from loadgen.shapes import ShapeParams
    from loadgen.shapes import generate as shape
    from loadgen.traces import TRACE_BLOCK_TOKENS as B

    p = ShapeParams(requests=600, rate=4.0)
    long = shape("longdoc", p, seed=3)
    assert long == shape("longdoc", p, seed=3) and long != shape("longdoc", p, seed=4)  # deterministic per seed
    docs = [r["hash_ids"][: (r["input_length"] - 1) // B] for r in long]
    assert all(p.doc_tokens[0] - B <= r["input_length"] <= p.doc_tokens[1] + p.question_tokens[1] + B for r in long)
    seen, repeats = set(), 0
    for d in docs:
        repeats += tuple(d) in seen
        seen.add(tuple(d))
    assert 0.06 <= repeats / len(long) <= 0.14  # ~10% repeat an earlier document, all its blocks
    sizes = sorted(r["input_length"] for r in long)
    assert sizes[len(sizes) // 2] < 0.5 * sizes[-1]  # heavy-tailed: the median far below the largest

    hot = shape("hotdoc", p, seed=3)
    first = hot[0]["hash_ids"][: p.hot_doc_tokens // B]
    on_hot = sum(r["hash_ids"][: len(first)] == first for r in hot)
    assert 0.4 <= on_hot / len(hot) <= 0.75  # half the traffic, plus conversations continuing on it
    # a continued conversation repeats every full block of its previous prompt: once question and answers fill
    # a block, turns share more than their document
    prompts = {tuple(r["hash_ids"][: r["input_length"] // B]) for r in hot}
    continued = sum(any(tuple(r["hash_ids"][:k]) in prompts for k in range(len(first) + 1, len(r["hash_ids"])))
                    for r in hot)
    assert continued >= 0.05 * len(hot)
    ts = [r["timestamp"] for r in hot]
    assert ts == sorted(ts) and abs(ts[-1] / 1000 - len(hot) / p.rate) < 0.25 * len(hot) / p.rate


def test_synth_shape_writes_a_mooncake_trace(tmp_path):
    import argparse

    from loadgen.__main__ import shape_trace
    from loadgen.traces import read_mooncake

    out = tmp_path / "t.jsonl"
    args = argparse.Namespace(kind="hotdoc", requests=50, rate=2.0, seed=1, trace_out=out, doc_tokens=None,
                              repeat_share=None, repeat_window=None, hot_share=0.9, hot_doc_tokens=4096,
                              tail_docs=5, continue_share=0.0, max_turns=None)
    lines = shape_trace(args)
    parsed = read_mooncake(out)
    assert len(parsed) == 50 and [x.hash_ids for x in parsed] == [x["hash_ids"] for x in lines]


@pytest.mark.parametrize("killer", ["timestamp", "username", "tools", "clean"])
def test_killers_are_deterministic_and_where_they_are_said_to_be(killer):
    from loadgen.synth import killer_text

    a = generate("killers", 40, 2.0, seed=4, killer=killer)
    assert [r.model_dump() for r in a] == [r.model_dump() for r in generate("killers", 40, 2.0, seed=4, killer=killer)]
    fixed = generate("killers", 40, 2.0, seed=4, killer=killer, fixed=True)
    systems = [r.body["messages"][0]["content"] for r in a]
    users = [r.body["messages"][1]["content"] for r in a]
    assert len(set(users)) == 40 and all(len(s) > 8000 for s in systems)  # unique questions, long shared text
    tail = systems[0][systems[0].index("Instructions:"):]
    assert all(s.endswith(tail) for s in systems + [r.body["messages"][0]["content"] for r in fixed])
    found = [killer_text(r.body) for r in a]
    if killer == "clean":
        assert found == [None] * 40 and len(set(systems)) == 1
        assert [r.model_dump() for r in fixed] == [r.model_dump() for r in a]
        return
    assert all(k and s.index(k) < 300 for k, s in zip(found, systems))  # early in the system prompt
    if killer == "timestamp":
        from datetime import datetime

        stamps = [datetime.fromisoformat(k.removeprefix("Current time: ").rstrip(".")) for k in found]
        start = stamps[0].timestamp() - a[0].timestamp / 1000
        assert all(abs(s.timestamp() - start - r.timestamp / 1000) < 1 for s, r in zip(stamps, a))  # arrival time
    if killer == "username":
        assert 3 <= len(set(found)) <= 30 and len(set(found)) < 40  # users come back
    if killer == "tools":
        lines = [k.splitlines()[1:] for k in found]
        assert all(len(x) == 8 and sorted(x) == sorted(lines[0]) for x in lines) and len(set(map(tuple, lines))) > 5
    for r, k in zip(fixed, found):
        s, u = r.body["messages"][0]["content"], r.body["messages"][1]["content"]
        if killer == "tools":
            assert killer_text(r.body) in s and killer_text(r.body).splitlines()[1:] == sorted(k.splitlines()[1:])
        else:
            assert killer_text(r.body) == k and u.endswith(k) and k not in s  # moved to the end of the question
    assert len({r.body["messages"][0]["content"] for r in fixed}) == 1  # fixed: one system prompt for all


def test_synth_cli_takes_the_killer_flags():
    args = parse(["synth", "killers", "--url", "http://x", "--killer", "tools", "--fixed"])
    assert (args.kind, args.killer, args.fixed) == ("killers", "tools", True)
    assert parse(["synth", "killers", "--url", "http://x"]).killer == "timestamp"
    with pytest.raises(ValueError, match="unknown killer"):
        generate("killers", 1, 1.0, killer="nope")


def test_replay_reads_an_openai_request_log(tmp_path):
    from loadgen.__main__ import build_jobs, parse

    log = tmp_path / "openai.jsonl"
    log.write_text(
        json.dumps({"timestamp": 2000, "tenant": "acme", "prefix_version": "v2",
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}) + "\n"
        + json.dumps({"timestamp": 500, "body": {"prompt": "once upon", "max_tokens": 2}}) + "\n")
    jobs = build_jobs(parse(["replay", str(log), "--url", "http://127.0.0.1:9"]), "m")
    assert [(j.at_s, j.endpoint) for j in jobs] == [(0.5, "/v1/completions"), (2.0, "/v1/chat/completions")]
    assert jobs[1].body == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "model": "m"}
    assert jobs[0].body == {"prompt": "once upon", "max_tokens": 2, "model": "m"}
