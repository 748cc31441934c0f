"""Who is calling: API keys to tenants, and the admin key.

Keys are held only as SHA-256 digests (``sha256:<hex>``, what ``sloproxy hash-key`` prints); a
key written in plain text in the config is hashed at load and the log says to store the digest
instead. A presented key is hashed and looked up by its digest, then the match is confirmed with
:func:`hmac.compare_digest`: the lookup's timing depends only on the digest, which says nothing
usable about any stored key. Nothing here ever logs a key or its digest.

With no key configured anywhere the proxy runs in *open mode*: every caller is let in, the
``x-tenant`` header names the tenant, and the admin API is open too; :meth:`Authenticator.warning`
says so loudly at start.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Iterable, Mapping

from .errors import ProxyError
from .slo import TenantConfig

log = logging.getLogger("sloproxy.auth")

DIGEST_PREFIX = "sha256:"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# Open mode names tenants by header: bounded, so made-up names cannot grow per-tenant state forever.
_TENANT_NAME = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
MAX_AD_HOC_TENANTS = 1000
OVERFLOW_TENANT = TenantConfig(name="other")  # every ad-hoc name past the bound


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return DIGEST_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def is_digest(entry: str) -> bool:
    """A stored key in its digest form (``sha256:`` and 64 lowercase hex digits)."""
    return _DIGEST.match(entry) is not None


def stored_form(entry: str) -> tuple[str, bool]:
    """(digest, was plain text) for a configured key entry."""
    if _DIGEST.match(entry):
        return entry, False
    return hash_key(entry), True


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a client sent: ``Authorization: Bearer <key>`` (what the OpenAI SDK sends)."""
    auth = headers.get("Authorization")
    if auth is None:
        return None
    scheme, _, key = auth.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


class KeyRing:
    """Digest -> owner, built once from config entries (digests or plain keys)."""

    def __init__(self, entries: Iterable[tuple[str, object]], what: str) -> None:
        self._owners: dict[str, tuple[bytes, object]] = {}  # digest -> (digest bytes, owner)
        plain = 0
        for entry, owner in entries:
            digest, was_plain = stored_form(entry)
            plain += was_plain
            self._owners[digest] = (digest.encode(), owner)
        if plain:
            log.warning(
                "%d %s key(s) are written in plain text in the config (allow_plaintext_keys): store their "
                "digests instead (`sloproxy hash-key`), so the config file no longer holds usable keys",
                plain,
                what,
            )

    def __bool__(self) -> bool:
        return bool(self._owners)

    def owner(self, key: str | None) -> object | None:
        if key is None:
            return None
        digest = hash_key(key)
        found = self._owners.get(digest)
        if found is None:
            return None
        stored, owner = found
        return owner if hmac.compare_digest(stored, digest.encode()) else None


class Authenticator:
    """Turns request headers into a tenant (OpenAI routes) or an admin check (admin routes)."""

    def __init__(self, tenants: Iterable[TenantConfig], admin_keys: Iterable[str]) -> None:
        tenants = list(tenants)
        self.tenants = {t.name: t for t in tenants}
        self._tenant_keys = KeyRing(((key, t) for t in tenants for key in t.api_keys), "tenant")
        self._admin_keys = KeyRing(((key, True) for key in admin_keys), "admin")
        self._ad_hoc: dict[str, TenantConfig] = {}

    @property
    def open(self) -> bool:
        """No key configured anywhere: nobody is asked who they are."""
        return not self._tenant_keys and not self._admin_keys

    def warning(self) -> str | None:
        """What an operator must hear at start about who can call this proxy (None: keys guard both)."""
        if self.open:
            return (
                "OPEN MODE: no API key is configured, so anyone who can reach this proxy may use every "
                "model and the admin API (fleet state, drain, reload). Configure tenants[].api_keys and "
                "admin.api_keys before exposing it."
            )
        if not self._tenant_keys:
            return "no tenant API key is configured: the OpenAI routes are open to anyone who can reach them"
        if not self._admin_keys:
            return "no admin key is configured: the admin API is disabled"
        return None

    def tenant(self, headers: Mapping[str, str]) -> TenantConfig | None:
        """The caller's tenant; raises 401 when keys are configured and the caller has none that fits.
        Without tenant keys, the ``x-tenant`` header names the tenant (None: the default tenant)."""
        if self._tenant_keys:
            key = presented_key(headers)
            tenant = self._tenant_keys.owner(key)
            if tenant is None:
                raise ProxyError(
                    401,
                    "Missing API key: send `Authorization: Bearer <key>`."
                    if key is None
                    else "Incorrect API key provided.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": 'Bearer realm="sloproxy"'},
                )
            return tenant  # type: ignore[return-value]
        return self._named(headers.get("x-tenant"))

    def _named(self, name: str | None) -> TenantConfig | None:
        """Open mode: a configured tenant by name, or an ad-hoc one (at most ``MAX_AD_HOC_TENANTS``;
        later names share ``other``)."""
        if name is None:
            return None
        tenant = self.tenants.get(name) or self._ad_hoc.get(name)
        if tenant is not None:
            return tenant
        if not _TENANT_NAME.match(name):
            raise ProxyError(400, "`x-tenant` must be 1 to 64 letters, digits or any of `._:@-`.", param="x-tenant")
        if len(self._ad_hoc) >= MAX_AD_HOC_TENANTS:
            if len(self._ad_hoc) == MAX_AD_HOC_TENANTS:
                log.warning("open mode: %d tenant names seen; later new names count as `other`", MAX_AD_HOC_TENANTS)
                self._ad_hoc[OVERFLOW_TENANT.name] = OVERFLOW_TENANT
            return OVERFLOW_TENANT
        tenant = self._ad_hoc[name] = TenantConfig(name=name)
        return tenant

    def check_admin(self, headers: Mapping[str, str]) -> None:
        """Raises unless the caller may use the admin API."""
        if self.open:
            return
        if not self._admin_keys:
            raise ProxyError(403, "The admin API is disabled: no admin key is configured.", code="admin_disabled")
        key = presented_key(headers)
        if self._admin_keys.owner(key) is None:
            raise ProxyError(
                401,
                "The admin API needs the admin key: send `Authorization: Bearer <admin key>`.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": 'Bearer realm="sloproxy-admin"'},
            )


def check_model_allowed(tenant: TenantConfig | None, model: str) -> None:
    if tenant is not None and tenant.models is not None and model not in tenant.models:
        raise ProxyError(
            403,
            f"Tenant `{tenant.name}` may not use model `{model}`.",
            param="model",
            code="model_not_allowed",
        )
