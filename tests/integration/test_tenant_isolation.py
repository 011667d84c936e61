"""Tenant isolation, end to end: a router with tenants A and B (distinct keys and secrets) in front of two sim
workers. The hard check: B never gets a cached token from a prefix A sent. And a small timing audit (the one of
bench/tenant_audit.py, 40 probes per cell instead of 200): B's TTFT must not tell whether A sent the prefix, while
A's own hit must be plain, so the audit can see a hit at all.

The thresholds are looser than the benchmark's (AUC <= 0.55 over 200 probes per arm): here B's AUC <= 0.7, over
40 probes per arm about three standard deviations above 0.5, so a noisy 2-core machine does not fail it by chance;
A's >= 0.9. A memo shared by tenants in the router (0.5 ms per warm key) gave B an AUC of 0.745 here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("tenant_audit", Path(__file__).parents[2] / "bench" / "tenant_audit.py")
tenant_audit = sys.modules.setdefault("tenant_audit", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(tenant_audit)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = tenant_audit.start_cluster(2, 3.0, tmp_path_factory.mktemp("tenant_audit"))
    yield c
    c.stop()


def test_another_tenant_gets_no_hit_and_no_timing_signal(cluster):
    res = tenant_audit.audit(cluster, probes=40, prefix_words=600, suffix_words=6, seed=13, warmup=4)
    ct = res["cached_tokens"]
    assert ct["B_primed"]["max"] == 0 and ct["B_control"]["max"] == 0, ct  # never a block of A's
    assert ct["A_primed"]["min"] > 0 and ct["A_control"]["max"] == 0, ct  # A's own prefix hits
    a, b = res["A_after_A_primed_vs_control"], res["B_after_A_primed_vs_control"]
    print(f"tenant audit, 40 probes per cell: A's AUC {a['auc']}, B's AUC {b['auc']} {b['auc_ci95_delong']}")
    assert a["auc"] >= 0.9, a  # the audit sees a hit when there is one
    assert b["auc"] <= 0.7, b  # and none across tenants
