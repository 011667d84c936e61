"""loadgen: workload parsing with line-numbered errors, trace prompts that keep the sharing structure under the
real tokenizer, statistics on a case with known answers, synthetic workloads, CLI argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loadgen.replay import Result
from loadgen.report import percentile, summarize
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
    s = summarize(rs, wall_s=5.0)
    assert (s["requests"], s["ok"], s["errors"], s["errors_by_status"]) == (11, 10, 1, {"503": 1})
    assert s["cached_token_ratio"] == pytest.approx(200 / 1000)
    assert s["ttft_p50_s"] == pytest.approx(0.5) and s["ttft_p99_s"] == pytest.approx(1.0)
    assert s["itl_p50_s"] == pytest.approx(0.05) and s["e2e_p90_s"] == pytest.approx(9)
    assert s["max_mean_load"] == pytest.approx(6 / 5)
    assert s["per_worker"]["a"]["request_share"] == pytest.approx(0.6)
    assert s["per_worker"]["a"]["cached_token_ratio"] == pytest.approx(200 / 600)
    assert s["throughput_rps"] == pytest.approx(2.0)
    assert percentile([], 50) is None and percentile([3, 1, 2], 50) == 2


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
