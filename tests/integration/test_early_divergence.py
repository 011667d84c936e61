"""The router's live early-divergence signal (prefixroute_router_prefix_shared_tokens) with a real router and sim
workers: clean traffic shares its whole stable prefix; once a rollout puts a timestamp at the top of the system
prompt, within a minute nearly every request diverges within 32 tokens, at the timestamp's token position."""

from __future__ import annotations

import datetime as dt
import random
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.procs import sim_cluster
from protocol.modelfiles import load_tokenizer, resolve_model_path
from protocol.prompt import render_chat

P = 256  # the router's default prefix_tokens
METRIC = "prefixroute_router_prefix_shared_tokens"
WORDS = ("the assistant answers questions about billing accounts invoices refunds shipping orders returns "
         "warranty policy customers support agents escalation tickets priority response within hours please "
         "always never include personal data summary steps").split()


@pytest.fixture(scope="module")
def cluster():
    with sim_cluster(2, "--sim-speedup", "50") as (_, router):
        yield router


def histogram(router: str) -> dict[float, float]:
    """Cumulative bucket counts (le -> count) of the open tenant's series."""
    text = httpx.get(router + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == METRIC:
            return {float(s.labels["le"]): s.value for s in family.samples
                    if s.name == METRIC + "_bucket" and s.labels["tenant"] == "open"}
    return {}


def delta(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {le: n - before.get(le, 0) for le, n in after.items()}


def median(cum: dict[float, float]) -> float:
    """histogram_quantile(0.5) of cumulative buckets: linear within the bucket that holds the middle."""
    les = sorted(cum)
    half, lower, below = cum[les[-1]] / 2, 0.0, 0.0
    for le in les:
        if cum[le] >= half:
            return lower + (le - lower) * (half - below) / max(cum[le] - below, 1e-9)
        lower, below = le, cum[le]
    raise AssertionError("empty histogram")


def expected(sent: list[list[int]], ids: list[int]) -> int:
    """The tracker's answer computed from the tokens: the longest common prefix with any earlier request,
    floored to 8 tokens (all of them when identical)."""
    best = 0
    for other in sent:
        n = 0
        while n < min(len(ids), len(other)) and ids[n] == other[n]:
            n += 1
        best = max(best, n)
    return best if best == len(ids) else best // 8 * 8


def test_early_divergence_rises_within_a_minute_of_a_timestamp_first_rollout(cluster):
    router = cluster
    tok = load_tokenizer(resolve_model_path(None))
    rng = random.Random(14)
    long_text = " ".join(rng.choice(WORDS) for _ in range(400)) + "."
    client = openai.OpenAI(base_url=router + "/v1", api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    sent: list[list[int]] = []
    depths: list[int] = []

    def ask(system: str, i: int) -> None:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: order #{i}?"}]
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=2)
        assert r.choices[0].finish_reason in ("length", "stop")
        ids = tok(render_chat(tok, messages), add_special_tokens=False).input_ids[:P]
        if sent:
            depths.append(expected(sent, ids))
        sent.append(ids)

    for i in range(40):
        ask(long_text, i)
    clean = histogram(router)
    n_clean = clean[float("inf")]
    assert n_clean == 39  # the tenant's first request has nothing to compare with
    assert clean[32.0] / n_clean <= 0.05
    assert clean[float(P)] - clean[128.0] == n_clean  # the whole stable prefix shared

    switch = time.monotonic()
    stamp = dt.datetime.now(dt.UTC)
    for i in range(40):
        stamp = max(stamp + dt.timedelta(milliseconds=1), dt.datetime.now(dt.UTC))
        ask(f"Current time: {stamp.isoformat(timespec='milliseconds').replace('+00:00', 'Z')}. {long_text}", 40 + i)
    rollout = delta(histogram(router), clean)
    elapsed = time.monotonic() - switch
    assert elapsed < 60
    n = rollout[float("inf")]
    assert n == 40
    assert rollout[32.0] / n > 0.8
    # Exactly the depths the tokens give, bucket by bucket.
    want = depths[len(depths) - 40:]
    assert {le: sum(d <= le for d in want) for le in rollout} == rollout
    # The timestamp's tokens: where two renderings with different times first differ, to where they agree again.
    a, b = sent[-1], sent[-2]
    first = next(k for k in range(P) if a[k] != b[k])
    start = next(k for k in range(P) if a[k] != sent[0][k])  # where the clean prompt and the stamped one part
    assert start < first < 40
    assert abs(median(rollout) - first) <= 8, (median(rollout), first)
