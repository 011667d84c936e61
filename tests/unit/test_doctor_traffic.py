"""The doctor's input: each log format read in timestamp order, prompts tokenized as the worker tokenizes them,
tenants (never a raw API key), prefix versions and salts, and malformed lines named by file and line."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from loadgen.doctor.traffic import DEFAULT_OUTPUT_TOKENS, _segments, _splitter, load_traffic, tokenize_texts
from loadgen.traces import TraceError, detect_format
from protocol.modelfiles import load_tokenizer, resolve_model_path
from protocol.prompt import render_chat


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_path(None))


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


SYS = {"role": "system", "content": "You are helpful. " * 5}


def chat(q: str, **extra) -> dict:
    return {"messages": [SYS, {"role": "user", "content": q}], **extra}


def worker_ids(tok, body: dict) -> list[int]:
    text = render_chat(tok, [{"role": m["role"], "content": m["content"]} for m in body["messages"]])
    return tok(text, add_special_tokens=False).input_ids


def test_loadgen_requests_sorted_tokenized_like_the_worker_with_hashed_tenants(tmp_path, tok):
    b1 = chat("Where is my parcel?", max_tokens=7, _api_key="sk-secret-1",
              metadata={"prefix_version": "v2"})
    b2 = {"prompt": "Once upon a time", "cache_salt": "s1"}
    b3 = {"prompt": [5, 6, 7, 8]}
    b4 = chat("How late is it?", max_completion_tokens=3)
    p = write(tmp_path, "r.jsonl", [
        {"timestamp": 30, "endpoint": "/v1/chat/completions", "body": b1},
        {"timestamp": 10, "endpoint": "/v1/completions", "body": b2, "prefix_version": "v1"},
        {"timestamp": 30, "endpoint": "/v1/completions", "body": b3},
        {"timestamp": 20, "endpoint": "/v1/chat/completions", "body": b4, "tenant": "acme"},
    ])
    t = load_traffic(p, tok)
    assert t.source == "requests" and t.tokenize_s >= 0
    r = t.requests
    assert [x.index for x in r] == [0, 1, 2, 3] and [x.timestamp_ms for x in r] == [10, 20, 30, 30]
    completion, chat4, chat1, ids = r  # equal timestamps keep file order
    assert chat1.tokens.dtype == np.int64 and chat1.tokens.tolist() == worker_ids(tok, b1)
    assert chat4.tokens.tolist() == worker_ids(tok, b4)
    assert completion.tokens.tolist() == tok("Once upon a time", add_special_tokens=False).input_ids
    assert ids.tokens.tolist() == [5, 6, 7, 8] and ids.input_length == 4
    key_tenant = "key-" + hashlib.sha256(b"sk-secret-1").hexdigest()[:8]
    assert chat1.tenant == key_tenant and "secret" not in chat1.tenant
    assert (chat1.version, chat1.salt, chat1.output_tokens) == ("v2", key_tenant, 7)
    assert (completion.tenant, completion.version, completion.salt) == ("", "v1", "s1")
    assert (chat4.tenant, chat4.salt, chat4.output_tokens) == ("acme", "acme", 3)
    assert (ids.tenant, ids.salt, ids.version, ids.output_tokens) == ("", None, None, DEFAULT_OUTPUT_TOKENS)
    assert all(x.hash_ids is None and x.input_length == len(x.tokens) for x in r)
    assert [x.timestamp_ms for x in load_traffic(p, tok, limit=2).requests] == [10, 30]  # the first 2 lines


def test_openai_logs_inline_and_wrapped_with_iso_or_missing_times(tmp_path, tok):
    many = [chat(f"Question {i}?") for i in range(600)]  # more than one tokenizer batch
    p = write(tmp_path, "o.jsonl", many)
    assert detect_format(p) == "openai"
    t = load_traffic(p, tok)
    assert t.source == "openai" and len(t.requests) == 600
    assert [x.timestamp_ms for x in t.requests[:3]] == [0, 1000, 2000]  # no times: one a second in file order
    assert all(x.tokens.tolist() == worker_ids(tok, b) for x, b in zip(t.requests[::97], many[::97]))
    q = write(tmp_path, "w.jsonl", [
        {"timestamp": "2026-12-02T10:00:01Z", "tenant": "t1", "body": chat("b")},
        {**chat("a", prefix_version="v9"), "timestamp": "2026-12-02T10:00:00+00:00"},
    ])
    a, b = load_traffic(q, tok).requests
    assert b.timestamp_ms - a.timestamp_ms == 1000 and a.version == "v9" and a.tenant == ""
    assert b.tenant == "t1" and b.tokens.tolist() == worker_ids(tok, chat("b"))


def test_mooncake_lines_keep_their_hash_ids(tmp_path, tok):
    p = write(tmp_path, "m.jsonl", [{"timestamp": 5, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]},
                                    {"timestamp": 1, "input_length": 100, "output_length": 0, "hash_ids": [1]}])
    t = load_traffic(p, tok)
    assert t.source == "mooncake"
    first, second = t.requests
    assert (first.hash_ids, first.input_length, first.output_tokens, first.tokens) == ([1], 100, 0, None)
    assert second.hash_ids == [1, 2] and second.timestamp_ms == 5


@pytest.mark.parametrize("lines,message", [
    ([{"timestamp": 0, "endpoint": "/v1/completions", "body": {"prompt": 5}}], "r.jsonl:2: body.prompt"),
    ([{"timestamp": 0, "endpoint": "/v1/nope", "body": {"prompt": "x"}}], "r.jsonl:2: endpoint"),
    (["{broken"], "r.jsonl:2: not JSON"),
    ([{"timestamp": 0, "endpoint": "/v1/completions", "body": {"prompt": ""}}], "r.jsonl:2: the prompt is empty"),
    ([{"timestamp": 0, "endpoint": "/v1/chat/completions",
       "body": {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}}], "r.jsonl:2: This content"),
])
def test_malformed_request_lines_name_file_and_line(tmp_path, tok, lines, message):
    good = {"timestamp": 0, "endpoint": "/v1/completions", "body": {"prompt": "x"}}
    p = write(tmp_path, "r.jsonl", [good, *lines])
    with pytest.raises(TraceError, match=message):
        load_traffic(p, tok)


@pytest.mark.parametrize("second,message", [
    ({"messages": []}, "o.jsonl:2: messages"),
    ({"timestamp": "yesterday", "prompt": "x"}, "o.jsonl:2: timestamp"),
    ({"prompt": "y"}, "o.jsonl:2: timestamp: missing"),  # the first line has one
    ({"body": {"model": "m"}}, "o.jsonl:2: body.neither messages nor prompt"),
    ({"tenant": 5, "prompt": "x", "timestamp": 1}, "o.jsonl:2: tenant"),
])
def test_malformed_openai_lines_name_file_and_line(tmp_path, tok, second, message):
    p = write(tmp_path, "o.jsonl", [{"prompt": "x", "timestamp": 0}, second])
    with pytest.raises(TraceError, match=message):
        load_traffic(p, tok)


def test_format_detection_keeps_the_old_formats(tmp_path):
    assert detect_format(write(tmp_path, "a.jsonl", [{"timestamp": 0, "endpoint": "/v1/completions",
                                                      "body": {}}])) == "requests"
    assert detect_format(write(tmp_path, "b.jsonl", [{"body": {"prompt": "x"}}])) == "openai"
    assert detect_format(write(tmp_path, "c.jsonl", [{"hash_ids": [], "body": 1}])) == "mooncake"
    with pytest.raises(TraceError, match="d.jsonl:1: neither"):
        detect_format(write(tmp_path, "d.jsonl", [{"x": 1}]))



def varied_texts(tok) -> list[str]:
    doc = "Title: Report\n\nSection 1\n  indented line\n\tTabbed 42 items\n1234567 digits\nend.\n"
    msgs = [{"role": "system", "content": "You are helpful.\nAnswer briefly."},
            {"role": "user", "content": "Summarise:\n" + doc},
            {"role": "assistant", "content": " leading space\nand a list:\n- one\n- two"},
            {"role": "user", "content": "Ünïcødé: 日本語のテキスト\n🙂 emoji\nπ≈3.14159"}]
    return [render_chat(tok, msgs), render_chat(tok, msgs[:2]), doc, doc * 3, "line one\r\nline two\r\n\r\nthree",
            "  two leading spaces\n   three\n\n\nfour", "a \nb\t\nc\n d\n\ne", "x<|im_end|>\n<|im_start|>y",
            "<|im_start|>user\nhi<|im_end|>", "don't\n's\n'll go", "\nstarts with a newline\n", "",
            "1999\n2000\n 2001\n2002 ", "word\u00a0\nnbsp\u2028sep\nx"]


def test_segment_tokenization_equals_whole_text_on_varied_texts(tok):
    texts = varied_texts(tok)
    ids, method = tokenize_texts(texts, tok)
    assert method == "segments:gpt2"
    for text, got in zip(texts, ids):
        assert got.dtype == np.int64 and got.tolist() == tok(text, add_special_tokens=False).input_ids, text
    split = _splitter(tok, "gpt2")
    assert len(_segments(split, texts[0])) > 5  # the chat is cut, so the comparison covers concatenation
    assert _segments(split, texts[8]) == ["<|im_start|>", "user\n", "hi", "<|im_end|>"]
    assert _segments(split, "a\n\n\nb\nc \nd") == ["a\n\n", "\nb\n", "c \nd"]
    assert _segments(_splitter(tok, "lone"), "a\n\nb\nc") == ["a\n\nb\n", "c"]


class WholeTextDiffers:
    """The real tokenizer, except that a text longer than 200 characters tokenizes with one more id at its end:
    the segments (each shorter) no longer add up to the whole."""

    def __init__(self, tok):
        self.tok = tok
        self.added_tokens_encoder = tok.added_tokens_encoder

    def __call__(self, texts, add_special_tokens):
        out = self.tok(texts, add_special_tokens=add_special_tokens)
        out.input_ids = [ids + [7] if len(t) > 200 else ids for t, ids in zip(texts, out.input_ids)]
        return out


def test_a_mismatch_on_the_sample_falls_back_to_whole_texts(tmp_path, tok):
    fake = WholeTextDiffers(tok)
    texts = [f"{'Shared line of a long document.' * 8}\nQuestion {i}?\nMore." for i in range(40)]
    ids, method = tokenize_texts(texts, fake)
    assert method == "whole"
    assert all(got.tolist() == tok(t, add_special_tokens=False).input_ids + [7] for t, got in zip(texts, ids))
    assert tokenize_texts(texts, tok)[1] == "segments:gpt2"
    p = write(tmp_path, "o.jsonl", [{"prompt": t} for t in texts])
    assert load_traffic(p, tok).tokenize_method == "segments:gpt2"
