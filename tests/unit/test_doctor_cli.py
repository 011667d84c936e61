"""`python -m loadgen analyze`: the doctor's CLI and report on small generated logs and a Mooncake trace."""

from __future__ import annotations

import contextlib
import io
import json
import re
from itertools import islice
from pathlib import Path

import pytest

from harness.fleet_sim import TRACE
from loadgen.__main__ import main as loadgen_main
from loadgen.doctor import report
from loadgen.doctor.cli import main
from loadgen.doctor.findings import Analysis, Finding
from loadgen.synth import generate

MOONCAKE = TRACE  # beside the checkout: ../shared/traces


def _write_log(path: Path, killer: str, requests: int) -> list[dict]:
    recs = generate("killers", requests, 4.0, seed=0, killer=killer)
    path.write_text("".join(json.dumps(r.model_dump()) + "\n" for r in recs))
    return [r.body for r in recs]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def killers(tmp_path_factory):
    d = tmp_path_factory.mktemp("killers")
    bodies = _write_log(d / "log.jsonl", "timestamp", 120)
    rc, stdout, stderr = _run([str(d / "log.jsonl"), "--workers", "4", "--json", "--out", str(d / "out")])
    return {"rc": rc, "stdout": stdout, "stderr": stderr, "out": d / "out", "bodies": bodies}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    _write_log(d / "log.jsonl", "clean", 60)
    return _run([str(d / "log.jsonl"), "--workers", "4", "--policy", "cache_aware"])


def test_killers_json_has_a_date_time_finding(killers):
    assert killers["rc"] == 0, killers["stderr"]
    printed = json.loads(killers["stdout"])
    written = json.loads((killers["out"] / "analysis.json").read_text())
    assert printed == written
    (f,) = [f for f in written["findings"] if "date/time" in f["hint"]]
    assert f["requests"] >= 100 and f["tokens_lost"] > 0 and f["ceiling_fixed"] > written["ceiling"]
    assert {(p["workers"], p["policy"]) for p in written["policy"]} == {(4, "cache_aware"), (4, "round_robin")}
    assert all(0 <= p["of_ceiling"] <= 1.01 for p in written["policy"])
    assert {"tokenize", "analyze", "policy"} <= set(written["seconds"])


def test_killers_markdown_and_png(killers):
    md = (killers["out"] / "analysis.md").read_text()
    assert "| # | tenant | tokens | requests | tokens lost |" in md
    assert re.search(r"^\| 1 \| - \| \d+-\d+ \| 120 \| [\d,]+ \([\d.]+%\) \|.*date/time", md, re.M)
    assert "| 4 | cache_aware |" in md and "| 4 | round_robin |" in md
    for row in md.splitlines():  # a finding's masked example never breaks its table row
        if row.startswith("| 1 |"):
            assert len(_cells(row)) == 9
    png = (killers["out"] / "analysis.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_killers_report_holds_no_prompt_text(killers):
    texts = [m["content"] for b in killers["bodies"] for m in b["messages"]]
    words = {w.lower() for t in texts for w in re.findall(r"[A-Za-z]{4,}", t)} - {"policy", "time"}  # report words
    stamps = {s for t in texts for s in re.findall(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", t)}
    assert len(words) > 20 and len(stamps) > 20
    for name in ("analysis.md", "analysis.json"):
        text = (killers["out"] / name).read_text()
        leaked = {w for w in re.findall(r"[A-Za-z]{4,}", text.lower()) if w in words}
        assert not leaked, (name, leaked)
        assert not [s for s in stamps if s in text] and "2026-12-02" not in text


def test_clean_log_has_no_findings(clean):
    rc, md, err = clean
    assert rc == 0, err
    assert "No findings" in md and "| # | tenant |" not in md
    assert "| 4 | cache_aware |" in md and "round_robin" not in md


def test_mooncake_needs_no_tokenizer(tmp_path, monkeypatch):
    import loadgen.doctor.cli
    import protocol.modelfiles

    def refuse(*a, **k):
        raise AssertionError("a Mooncake trace loaded a tokenizer")

    monkeypatch.setattr(protocol.modelfiles, "load_tokenizer", refuse)
    monkeypatch.setattr(loadgen.doctor.cli, "_tokenizer", refuse)  # also when one is cached from another test
    trace = tmp_path / "mc.jsonl"
    if MOONCAKE.exists():
        with MOONCAKE.open() as f:
            trace.write_text("".join(islice(f, 300)))
    else:
        trace.write_text("".join(json.dumps({"timestamp": 100 * i, "input_length": 2048, "output_length": 16,
                                             "hash_ids": [0, 1, 2, 10 + i]}) + "\n" for i in range(40)))
    rc, out, err = _run([str(trace), "--workers", "4", "--policy", "cache_aware", "--json", "--out",
                         str(tmp_path / "out")])
    assert rc == 0, err
    a = json.loads(out)
    assert a["source"] == "mooncake" and a["findings"] == [] and a["block_tokens"] == 512
    assert 0 < a["ceiling"] < 1 and a["policy"][0]["block_tokens"] == 512
    assert "tokenize" not in a["seconds"] and a["notes"]
    assert (tmp_path / "out" / "analysis.png").exists()


def test_errors_exit_2_without_traceback(tmp_path, capsys):
    assert loadgen_main(["analyze", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hash_ids": [1], "timestamp": 0}\n')
    assert main([str(bad), "--no-policy"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "Traceback" not in err


def _cells(row: str) -> list[str]:
    return re.split(r"(?<!\\)\|", row)[1:-1]


def _analysis(**kw) -> Analysis:
    groups = {"a|b": {"requests": 3, "prompt_tokens": 300, "ceiling": 0.5, "ceiling_fixed": 0.9},
              "c": {"requests": 1, "prompt_tokens": 100, "ceiling": 0.0, "ceiling_fixed": 0.2}}
    base = dict(source="openai", requests=4, prompt_tokens=400, block_tokens=16, ceiling=0.375, ceiling_fixed=0.725,
                findings=[Finding("a|b", 3, 9, 3, 140, 0.725, "move_to_end", "looks like an id: move it",
                                  "Aa: [a0|0]\n\nAa `a`", ["v1"])],
                tenants=groups, versions={"v1": groups["a|b"], "v2": groups["c"]}, notes=["a note"])
    return Analysis(**{**base, **kw})


def test_markdown_escapes_cells_and_lists_tenants_and_versions():
    md = report.markdown(_analysis())
    row = next(r for r in md.splitlines() if r.startswith("| 1 |"))
    assert "\n" not in row and "⏎⏎" in row and "a\\|b" in row and "[a0\\|0]" in row
    assert len(_cells(row)) == 10 and _cells(row)[-1] == " v1 "  # its prefix versions, as there are two
    assert "## Tenants" in md and "| a\\|b | 3 | 300 | 50.0% | 90.0% |" in md
    assert "## Prefix versions" in md and "| v2 | 1 | 100 | 0.0% | 20.0% |" in md
    assert "- a note" in md and "35.0%" in md  # tokens lost: 140 of 400 prompt tokens
    one = _analysis(tenants={"": _analysis().tenants["c"]}, versions={})
    assert "## Tenants" not in report.markdown(one) and "## Prefix versions" not in report.markdown(one)


def test_to_json_rounds():
    a = _analysis(ceiling=1 / 3, seconds={"analyze": 0.123456})
    d = report.to_json(a)
    assert d["ceiling"] == 0.3333 and d["seconds"]["analyze"] == 0.123
    assert d["findings"][0]["example"] == _analysis().findings[0].example
