"""Tenants: API key -> tenant, checked in constant time; each tenant's secret keys its routing hashes and the
cache salt sent upstream, so a client can never reach another tenant's cache blocks."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache

from protocol.errors import APIError
from router.settings import TenantConfig

OPEN_TENANT_ID = "open"


@dataclass(frozen=True)
class Tenant:
    id: str
    key: bytes  # 32 bytes derived from the tenant secret; never logged, never sent upstream

    def cache_salt(self, client_salt: str | None) -> str:
        """The upstream `cache_salt`: the client's own salt is scoped under its tenant, never used as is."""
        return _salt(self.key, client_salt or "")


@lru_cache(maxsize=4096)
def _salt(key: bytes, client_salt: str) -> str:
    return hmac.new(key, b"cache-salt\x00" + client_salt.encode(), hashlib.sha256).hexdigest()[:32]


def derive_key(secret: str) -> bytes:
    return hashlib.sha256(b"prefixroute/tenant/v1\x00" + secret.encode()).digest()


def _digest(api_key: str) -> bytes:
    # surrogateescape: aiohttp decodes header bytes that are not UTF-8 that way; they must give a 401, not a 500
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).digest()


class Tenants:
    def __init__(self, configs: list[TenantConfig], open_secret: str):
        self.open = not configs
        self._open_tenant = Tenant(OPEN_TENANT_ID, derive_key(open_secret))
        # Indexed by the SHA-256 of the key: the lookup's timing depends on the digest, not on the key.
        self._by_digest: dict[bytes, tuple[bytes, Tenant]] = {}
        for c in configs:
            d = _digest(c.api_key.get_secret_value())
            if d in self._by_digest:
                raise ValueError(f"tenant {c.id}: API key already used by another tenant")
            self._by_digest[d] = (d, Tenant(c.id, derive_key(c.secret.get_secret_value())))

    def authenticate(self, authorization: str | None) -> Tenant:
        if self.open:
            return self._open_tenant
        if not authorization or not authorization.startswith("Bearer "):
            raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
        d = _digest(authorization[7:].strip())
        stored, tenant = self._by_digest.get(d, (b"\x00" * 32, None))
        if not hmac.compare_digest(stored, d) or tenant is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return tenant


def check_admin(authorization: str | None, admin_key: str | None) -> None:
    if admin_key is None:
        raise APIError(403, "The admin API is disabled: set an admin key to enable it.", code="admin_disabled")
    given = authorization[7:].strip() if authorization and authorization.startswith("Bearer ") else ""
    if not hmac.compare_digest(_digest(given), _digest(admin_key)):
        raise APIError(401, "Incorrect admin key.", code="invalid_api_key")
