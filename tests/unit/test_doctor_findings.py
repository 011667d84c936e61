"""The prefix doctor finds each known killer where it is, with its request count and cost, and nothing in clean
traffic; tenants stay apart; a killer hidden behind another is found in a second round."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest

from loadgen.doctor import hints
from loadgen.doctor.findings import analyze
from loadgen.doctor.traffic import load_traffic
from loadgen.synth import generate, killer_text
from protocol.modelfiles import load_tokenizer, resolve_model_path
from protocol.prompt import render_chat

N = 200
_VALUE = {"timestamp": re.compile(r"\d{4}-\d\d-\d\dT[\d:]+Z"), "username": re.compile(r"(?<=name is ).+?(?=\.)"),
          "tools": re.compile(r"- ")}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_path(None))


def _write(path, recs):
    path.write_text("".join(json.dumps(r.model_dump()) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def traffic(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("killers")
    out = {}
    for killer in ("timestamp", "username", "tools", "clean"):
        for fixed in (False, True):
            recs = generate("killers", N, 2.0, seed=3, killer=killer, fixed=fixed)
            out[killer, fixed] = (recs, load_traffic(_write(d / f"{killer}{fixed}.jsonl", recs), tok))
    return out


def _true_start(tok, body: dict, killer: str) -> int:
    """Token position where the killer's varying value starts in the rendered prompt."""
    text = render_chat(tok, [{"role": m["role"], "content": m["content"]} for m in body["messages"]])
    sentence = killer_text(body)
    at = text.index(sentence) + _VALUE[killer].search(sentence).start()
    return len(tok(text[:at], add_special_tokens=False).input_ids)


def _tokens(t) -> int:
    return sum(len(r.tokens) for r in t.requests)


@pytest.mark.parametrize("killer", ["timestamp", "username", "tools"])
def test_each_killer_is_found_where_it_is_with_its_count_and_cost(tok, traffic, killer):
    recs, t = traffic[killer, False]
    a = analyze(t, 16, tok)
    assert len(a.findings) == 1, a.findings
    f = a.findings[0]
    assert abs(f.start - _true_start(tok, recs[0].body, killer)) < 16  # within a block
    assert f.requests >= 0.98 * N
    assert f.fix == ("sort_items" if killer == "tools" else "move_to_end")
    assert f.hint == {"timestamp": hints.DATE, "username": hints.USER, "tools": hints.ORDER}[killer]
    # the cost and the fixed ceiling agree with the same traffic generated without the killer
    fixed = analyze(traffic[killer, True][1], 16, tok)
    truth_lost = fixed.ceiling * _tokens(traffic[killer, True][1]) - a.ceiling * _tokens(t)
    assert truth_lost > 0.05 * _tokens(t)
    assert f.tokens_lost == pytest.approx(truth_lost, rel=0.1)
    assert abs(a.ceiling_fixed - fixed.ceiling) <= 0.02
    assert a.ceiling_fixed > a.ceiling
    # the example is masked: none of the killer's raw text, no digit, no letter but the class letters
    assert killer_text(recs[0].body) not in f.example
    assert not re.search(r"[1-9]|[b-zB-Z]", f.example), f.example


def test_clean_and_fixed_traffic_have_no_finding(tok, traffic):
    for key in [("clean", False)] + [(k, True) for k in ("timestamp", "username", "tools")]:
        a = analyze(traffic[key][1], 16, tok)
        assert a.findings == [], (key, a.findings)
        assert a.ceiling == a.ceiling_fixed > 0.9


def test_tenants_never_share_and_are_reported_apart(tok, traffic):
    _, t = traffic["timestamp", False]
    reqs = [dataclasses.replace(r, index=2 * r.index + k, tenant=f"t{k}", salt=f"t{k}")
            for r in t.requests for k in (0, 1)]
    both = analyze(dataclasses.replace(t, requests=reqs), 16, tok)
    alone = analyze(t, 16, tok)
    assert set(both.tenants) == {"t0", "t1"}
    for stats in both.tenants.values():
        assert stats["ceiling"] == pytest.approx(alone.ceiling)  # the twin tenant's prompts hit nothing
    assert sorted(f.tenant for f in both.findings) == ["t0", "t1"]


def _chat(system: str, question: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 8}


def test_a_killer_behind_another_is_found_in_a_second_round_at_its_original_position(tok, tmp_path):
    rng = random.Random(5)
    words = "parcel route invoice refund policy warranty delivery store price stock label".split()
    middle = " ".join(rng.choice(words) for _ in range(60))
    tail = " ".join(rng.choice(words) for _ in range(600))
    users = ["Ana Lima", "Bo Chen", "Cara Diaz", "Dev Rao", "Eli Park", "Fay Wong"]
    lines, name_at = [], []
    for i in range(150):
        system = (f"Session 7f3a{i:04x}c2d9e1b0 opened. {middle} The customer is {rng.choice(users)}. {tail}")
        lines.append({"timestamp": i * 100, "tenant": "acme", **_chat(system, f"question {i} {rng.random()}")})
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    t = load_traffic(path, tok)
    text = render_chat(tok, lines[0]["messages"])
    name_at = len(tok(text[:text.index("The customer is ") + 16], add_special_tokens=False).input_ids)
    id_at = len(tok(text[:text.index("7f3a")], add_special_tokens=False).input_ids)
    a = analyze(t, 16, tok)
    found = sorted(a.findings, key=lambda f: f.start)
    assert len(found) == 2, found
    assert abs(found[0].start - id_at) < 16 and found[0].hint == hints.ID
    assert abs(found[1].start - name_at) < 16 and found[1].hint == hints.USER
    assert all(f.requests >= 140 and f.tenant == "acme" for f in found)
    assert a.ceiling < 0.1 < 0.8 < a.ceiling_fixed


def test_mooncake_trace_gives_the_exact_ideal_ceiling_and_no_span():
    from harness.fleet_sim import TRACE, load_trace, offline_hit_ratio
    from loadgen.doctor.traffic import load_traffic as load

    if not TRACE.exists():
        pytest.skip(f"{TRACE} not found (the traces live beside the checkout, not in it)")

    a = analyze(load(TRACE, None, limit=500))
    assert a.ceiling == pytest.approx(offline_hit_ratio(load_trace(TRACE, 500), None))
    assert a.findings == [] and a.notes


def test_hints_and_mask():
    assert hints.hint(["2026-12-02T11:22:05Z", "2026-12-02T11:22:06Z"]) == hints.DATE
    assert hints.hint(["req 9f8e7d6c5b4a", "req 0a1b2c3d4e5f"]) == hints.ID
    assert hints.hint(["Ana", "Bo", "Ana", "Bo"]) == hints.USER
    assert hints.hint(["alpha", "beta", "gamma"]) == hints.REQUEST
    assert hints.hint(["x"], ordered=True) == hints.ORDER
    assert hints.mask("Ana Lima 2026-12-02, id=7f") == "Aaa Aaaa 0000-00-00, aa=0a"
