"""Worker settings: env prefix, CLI precedence, clean refusal of bad values."""

import subprocess
import sys

from worker.settings import WorkerSettings, default_cache_bytes, parse_args


def test_env_then_cli(monkeypatch):
    monkeypatch.setenv("PREFIXROUTE_WORKER_BLOCK_SIZE", "32")
    monkeypatch.setenv("PREFIXROUTE_WORKER_CACHE_BYTES", "1000")
    s = parse_args(["--port", "9000", "--cache-bytes", "5000"])
    assert (s.block_size, s.cache_bytes, s.port, s.name) == (32, 5000, 9000, "127.0.0.1:9000")
    assert parse_args(["--no-cache-generated"]).cache_generated is False
    assert WorkerSettings().cache_generated is True


def test_default_cache_budget():
    assert default_cache_bytes("cuda", 40 << 30, 64 << 30) == 20 << 30
    assert default_cache_bytes("cpu", None, 8 << 30) == 2 << 30
    assert default_cache_bytes("cpu", None, 64 << 30) == 4 << 30


def test_bad_settings_exit_2_without_traceback():
    r = subprocess.run([sys.executable, "-m", "worker", "--block-size", "0"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "invalid setting block_size" in r.stderr and "Traceback" not in r.stderr


def test_empty_environment_values_mean_unset(monkeypatch):
    """Compose writes `${VAR:-}` as an empty string: an empty admin key must not enable the admin API."""
    from router.settings import RouterSettings
    from worker.settings import WorkerSettings

    for name in ("ADMIN_KEY", "REDIS_URL", "MODEL"):
        monkeypatch.setenv(f"PREFIXROUTE_ROUTER_{name}", "")
    for name in ("REDIS_URL", "MODEL", "ADVERTISE_URL"):
        monkeypatch.setenv(f"PREFIXROUTE_WORKER_{name}", " ")
    r, w = RouterSettings(), WorkerSettings()
    assert r.admin_key is None and r.redis_url is None and r.model is None
    assert w.redis_url is None and w.model is None and w.advertise_url is None
