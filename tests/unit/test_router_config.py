"""Router settings sources and pool membership: file < env < CLI; drain and remove leave the ring."""

from __future__ import annotations

import pytest

from router.settings import load_settings, parse_args
from router.workers import WorkerPool, normalize_url


def test_yaml_and_toml_files_with_env_and_cli_precedence(tmp_path, monkeypatch):
    y = tmp_path / "r.yaml"
    y.write_text("policy: round_robin\nspill_rpm: 30\nworkers:\n  - {url: 'http://a:1', weight: 3}\n"
                 "tenants:\n  - {id: t, api_key: sk-abc123, secret: topsecret}\n")
    s = load_settings({}, str(y))
    assert (s.policy, s.spill_rpm, s.workers[0].weight, s.open_mode) == ("round_robin", 30, 3, False)
    assert "sk-abc123" not in repr(s.tenants[0]) and "topsecret" not in repr(s)  # secrets are SecretStr: never printed
    monkeypatch.setenv("PREFIXROUTE_ROUTER_SPILL_RPM", "45")
    assert load_settings({}, str(y)).spill_rpm == 45  # env beats the file
    assert parse_args(["--config", str(y), "--spill-rpm", "60", "--policy", "random"]).spill_rpm == 60
    t = tmp_path / "r.toml"
    t.write_text('policy = "least_loaded"\nprefix_tokens = 128\n[[workers]]\nurl = "http://b:2"\n')
    s = load_settings({}, str(t))
    assert (s.policy, s.prefix_tokens, s.workers[0].url) == ("least_loaded", 128, "http://b:2")


def test_drain_and_remove_leave_the_ring_and_keep_in_flight_accounting():
    pool = WorkerPool(vnodes=40)
    for u in ("http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3/"):
        pool.add(u)
        pool.mark_ok(normalize_url(u))
    assert len(pool.active) == 3 and len(pool.ring) == 3
    pool.acquire("http://127.0.0.1:1")
    assert pool.drain("http://127.0.0.1:1") and "http://127.0.0.1:1" not in pool.active
    assert pool.inflight("http://127.0.0.1:1") == 1  # its running request finishes there
    pool.release("http://127.0.0.1:1")
    assert pool.total_inflight == 0
    assert pool.remove("http://127.0.0.1:3") and len(pool.ring) == 1
    pool.mark_failed("http://127.0.0.1:2", immediate=True)
    assert pool.active == [] and not pool.drain("http://nope:1")
    with pytest.raises(ValueError):
        normalize_url("ftp://x")


def test_a_removed_workers_metric_series_go_with_it():
    from prometheus_client import generate_latest

    from router.metrics import RouterMetrics

    pool = WorkerPool(vnodes=40)
    a, b = "http://127.0.0.1:1", "http://127.0.0.1:2"
    for u in (a, b):
        pool.add(u)
        pool.mark_ok(u)
    m = RouterMetrics(pool)
    for u in (a, b):
        m.requests.labels("affinity", u, "200").inc()
        m.requests.labels("failover", u, "200").inc()
        m.upstream_latency.labels(u).observe(0.01)
        m.upstream_errors.labels(u, "503").inc()
    assert generate_latest(m.registry).decode().count(f'"{a}"') >= 6
    pool.remove(a)
    text = generate_latest(m.registry).decode()
    assert a not in text and text.count(f'"{b}"') >= 6
