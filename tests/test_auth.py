"""API keys, tenants, rate limits and the admin API: units, then a proxy driven by the openai client."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterator
from unittest import mock

import openai
import pytest
import yaml

from sloproxy.auth import MAX_AD_HOC_TENANTS, Authenticator, KeyRing, hash_key, presented_key, stored_form
from sloproxy.config import ConfigError, parse_config
from sloproxy.errors import ProxyError
from sloproxy.processes import EmulatorProcess, ProxyProcess
from sloproxy.ratelimit import WINDOW_S, SlidingWindows, TenantLimits
from sloproxy.request import parse_request
from sloproxy.slo import TenantConfig
from tests.helpers import get, post_json

ACME_KEY = "sk-acme-0123456789"
BETA_KEY = "sk-beta-abcdefghij"
ADMIN_KEY = "sk-admin-zyxwvuts"
MESSAGES = [{"role": "user", "content": "Hello there."}]


# ----- keys ---------------------------------------------------------------------------------------
def test_keys_are_held_as_digests_and_plain_ones_are_hashed_with_a_warning(caplog):
    digest = hash_key(ACME_KEY)
    assert digest.startswith("sha256:") and len(digest) == 7 + 64 and ACME_KEY not in digest
    assert stored_form(digest) == (digest, False)
    assert stored_form(ACME_KEY) == (digest, True)
    with caplog.at_level(logging.WARNING, logger="sloproxy.auth"):
        ring = KeyRing([(digest, "acme"), (BETA_KEY, "beta")], "tenant")
    assert "1 tenant key(s) are written in plain text" in caplog.text
    assert BETA_KEY not in caplog.text and hash_key(BETA_KEY) not in caplog.text
    assert ring.owner(ACME_KEY) == "acme" and ring.owner(BETA_KEY) == "beta"
    assert ring.owner(digest) is None  # the digest itself is not a key
    assert ring.owner("sk-wrong") is None and ring.owner(None) is None


def test_presented_key_reads_bearer_tokens_only():
    assert presented_key({"Authorization": f"Bearer {ACME_KEY}"}) == ACME_KEY
    assert presented_key({"Authorization": f"bearer   {ACME_KEY} "}) == ACME_KEY
    assert presented_key({"Authorization": f"Basic {ACME_KEY}"}) is None
    assert presented_key({"Authorization": "Bearer "}) is None
    assert presented_key({}) is None


def test_authenticator_open_mode_and_keyed_mode():
    open_mode = Authenticator([TenantConfig("acme")], [])
    assert open_mode.open and "OPEN MODE" in (open_mode.warning() or "")
    assert open_mode.tenant({}) is None
    assert open_mode.tenant({"x-tenant": "acme"}).name == "acme"
    open_mode.check_admin({})  # open mode: open

    tenants = [TenantConfig("acme", api_keys=[hash_key(ACME_KEY)]), TenantConfig("beta", api_keys=[BETA_KEY])]
    keyed = Authenticator(tenants, [hash_key(ADMIN_KEY)])
    assert not keyed.open and keyed.warning() is None
    assert keyed.tenant({"Authorization": f"Bearer {BETA_KEY}"}).name == "beta"
    for headers, message in (({}, "Missing API key"), ({"Authorization": "Bearer nope"}, "Incorrect API key")):
        with pytest.raises(ProxyError) as caught:
            keyed.tenant({**headers, "x-tenant": "acme"})  # the header names nobody once keys exist
        assert caught.value.status == 401 and caught.value.code == "invalid_api_key"
        assert message in caught.value.message and "WWW-Authenticate" in (caught.value.headers or {})
    with pytest.raises(ProxyError) as caught:
        keyed.check_admin({"Authorization": f"Bearer {ACME_KEY}"})  # a tenant key is not the admin key
    assert caught.value.status == 401
    keyed.check_admin({"Authorization": f"Bearer {ADMIN_KEY}"})

    no_admin = Authenticator(tenants, [])
    assert "admin API is disabled" in (no_admin.warning() or "")
    with pytest.raises(ProxyError) as caught:
        no_admin.check_admin({"Authorization": f"Bearer {ADMIN_KEY}"})
    assert caught.value.status == 403 and caught.value.code == "admin_disabled"


def test_open_mode_tenant_names_are_checked_and_bounded(caplog):
    auth = Authenticator([], [])
    for bad in ("", "a" * 65, "acme\u00e9", "a b", "x;y"):
        with pytest.raises(ProxyError) as caught:
            auth.tenant({"x-tenant": bad})
        assert caught.value.status == 400 and caught.value.param == "x-tenant"
    names = [auth.tenant({"x-tenant": f"t{i}"}).name for i in range(MAX_AD_HOC_TENANTS + 50)]
    assert names[:MAX_AD_HOC_TENANTS] == [f"t{i}" for i in range(MAX_AD_HOC_TENANTS)]
    assert set(names[MAX_AD_HOC_TENANTS:]) == {"other"}
    assert auth.tenant({"x-tenant": "t7"}).name == "t7"  # names seen before keep theirs
    assert len(auth._ad_hoc) == MAX_AD_HOC_TENANTS + 1


def test_config_refuses_shared_keys_unknown_models_and_duplicate_tenants_without_quoting_keys():
    base = {
        "backends": [{"name": "a", "engine": "vllm", "url": "http://127.0.0.1:1", "models": ["m1"]}],
        "allow_plaintext_keys": True,
    }
    cases = [
        (
            {"tenants": [{"name": "x", "api_keys": [ACME_KEY]}, {"name": "y", "api_keys": [hash_key(ACME_KEY)]}]},
            "`$.tenants[1]`.api_keys[0] is also a key of tenant 'x'",
        ),
        ({"tenants": [{"name": "x", "models": ["m9"]}]}, "`$.tenants[0]`.models names 'm9'"),
        ({"tenants": [{"name": "x"}, {"name": "x"}]}, "tenant name 'x' is used twice"),
        (
            {"tenants": [{"name": "x", "api_keys": [ACME_KEY]}], "admin": {"api_keys": [ACME_KEY]}},
            "`$.admin.api_keys[0]` is also a tenant's key",
        ),
        ({"tenants": [{"name": "x", "rpm": 0}]}, "$.tenants[0].rpm"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError) as caught:
            parse_config({**base, **extra})
        assert message in str(caught.value) and ACME_KEY not in str(caught.value)


# ----- rate limits --------------------------------------------------------------------------------
class Clock:
    def __init__(self, now: float = 600.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_sliding_window_counts_the_previous_minute_by_its_overlap():
    clock = Clock(600.0)  # the start of a window
    windows = SlidingWindows(clock)
    assert [windows.take("k", 4, 60.0)[0] for _ in range(4)] == [True] * 4
    allowed, wait = windows.take("k", 4, 60.0)
    assert not allowed and wait == pytest.approx(75.0)  # the next window, once this one weighs 3/4
    clock.now = 660.0 + 15.0  # a quarter into the next window: 4 * 0.75 = 3 still count
    assert windows.take("k", 4, 60.0) == (True, 0.0)
    assert not windows.take("k", 4, 60.0)[0]
    clock.now = 660.0 + 45.0  # 4 * 0.25 + 1 = 2 count: two more fit
    assert [windows.take("k", 4, 60.0)[0] for _ in range(3)] == [True, True, False]
    assert windows.take("other", 4, 60.0) == (True, 0.0)  # keys are independent
    assert windows.take("big", 4, 60.0, cost=5) == (False, 60.0)
    clock.now = 1000.0  # long idle: everything forgotten
    assert windows.take("k", 4, 60.0, cost=4) == (True, 0.0)
    windows.charge("k", 60.0, -2)  # a refund makes room
    assert windows.take("k", 4, 60.0, cost=2) == (True, 0.0)


def _request(prompt: str, max_tokens: int):
    return parse_request(
        "chat",
        json.dumps(
            {"model": "m1", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        ).encode(),
    )


async def test_tokens_per_minute_charge_an_estimate_then_the_true_count():
    clock = Clock()
    limits = TenantLimits(clock=clock)
    tenant = TenantConfig("acme", tpm=1000, rpm=100)
    first = _request("hi", 100)
    await limits.admit(tenant, first)
    assert first.tokens_charged == first.est_prompt_tokens + 100
    first.prompt_tokens, first.completion_tokens = 50, 850  # the engine's usage: far more than estimated
    limits.settle(tenant, first)
    assert first.tokens_charged == 0
    second = _request("hi", 100)
    with pytest.raises(ProxyError) as caught:
        await limits.admit(tenant, second)  # 900 used + this one's ~120 > 1000
    assert caught.value.status == 429 and caught.value.code == "rate_limit_exceeded"
    assert "1000 tokens per minute" in caught.value.message and int(caught.value.headers["Retry-After"]) >= 1
    never_served = _request("hi", 50)
    clock.now += WINDOW_S * 2
    await limits.admit(tenant, never_served)
    limits.settle(tenant, never_served)  # no usage, nothing sent: a full refund
    assert limits.local.take("tenant:acme:tpm", 1000, WINDOW_S, 1000) == (True, 0.0)
    clock.now += WINDOW_S * 2
    with pytest.raises(ProxyError) as caught:
        await limits.admit(tenant, _request("x" * 5000, 10))  # ~1,250 prompt tokens never fit 1,000
    assert caught.value.status == 429 and "Request too large" in caught.value.message


async def test_a_refused_token_check_gives_the_request_back_to_the_rpm_window():
    limits = TenantLimits(clock=Clock())
    tenant = TenantConfig("acme", tpm=100, rpm=2)
    with pytest.raises(ProxyError):
        await limits.admit(tenant, _request("hi", 500))
    for _ in range(2):  # both requests of the minute are still there
        await limits.admit(tenant, _request("hi", 10))


async def test_rate_limits_hold_across_replicas_through_redis(redis_server):
    from sloproxy.config import StateConfig
    from sloproxy.state.redis_state import RedisCoordinator

    config = StateConfig(backend="redis", url=redis_server.url, namespace=f"auth{time.monotonic_ns()}")
    replicas = [RedisCoordinator(config, ["a"]) for _ in range(2)]
    for replica in replicas:
        await replica.start()
    try:
        tenant = TenantConfig("acme", rpm=3, tpm=10_000)
        one, two = TenantLimits(replicas[0]), TenantLimits(replicas[1])
        await one.admit(tenant, _request("hi", 10))
        await two.admit(tenant, _request("hi", 10))
        request = _request("hi", 10)
        await one.admit(tenant, request)
        with pytest.raises(ProxyError) as caught:
            await two.admit(tenant, _request("hi", 10))  # the fourth request of the minute, on the other replica
        assert caught.value.status == 429 and "3 requests per minute" in caught.value.message
        request.prompt_tokens, request.completion_tokens = 9000, 900  # settled through Redis
        one.settle(tenant, request)
        await one.stop()
        allowed, _ = await replicas[1].take_rate("tenant:acme:tpm", 10_000, WINDOW_S, 200)
        assert not allowed  # about 9,900 + the two others' estimates already counted
    finally:
        for replica in replicas:
            await replica.stop()


# ----- the proxy, end to end ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet() -> Iterator[EmulatorProcess]:
    instances = [
        {"name": "a", "engine": "vllm", "model": "m1"},
        {"name": "b", "engine": "vllm", "model": "m1"},
        {"name": "c", "engine": "vllm", "model": "m2"},
    ]
    with EmulatorProcess(instances, speedup=20.0) as running:
        yield running


def _config(fleet: EmulatorProcess, **extra) -> dict:
    return {
        "backends": [
            {"name": "a", "engine": "vllm", "url": fleet.url("a"), "models": ["m1"]},
            {"name": "b", "engine": "vllm", "url": fleet.url("b"), "models": ["m1"]},
            {"name": "c", "engine": "vllm", "url": fleet.url("c"), "models": ["m2"]},
        ],
        "policy": {"name": "least-load"},
        "tenants": [
            {"name": "acme", "api_keys": [hash_key(ACME_KEY)], "default_class": "interactive"},
            {"name": "beta", "api_keys": [hash_key(BETA_KEY)], "models": ["m1"], "rpm": 3, "band": 1},
        ],
        "admin": {"api_keys": [hash_key(ADMIN_KEY)]},
        "tracing": {"exporter": "console"},  # spans go to the log: the test reads them for keys
        **extra,
    }


@pytest.fixture(scope="module")
def proxy(fleet: EmulatorProcess) -> Iterator[ProxyProcess]:
    with (
        mock.patch.dict(os.environ, {"SLOPROXY_LOG_LEVEL": "DEBUG", "OTEL_BSP_SCHEDULE_DELAY": "100"}),
        ProxyProcess(_config(fleet)) as running,
    ):
        yield running


def client(proxy: ProxyProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)


def admin(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_decide_who_gets_in_and_which_models_they_see(proxy):
    chat = client(proxy, ACME_KEY).chat.completions.create(model="m2", messages=MESSAGES, max_tokens=4)
    assert chat.choices[0].message.content
    with pytest.raises(openai.AuthenticationError) as caught:
        client(proxy, "sk-not-a-key").chat.completions.create(model="m1", messages=MESSAGES, max_tokens=4)
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(proxy, "sk-not-a-key").models.list()
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client(proxy, BETA_KEY).chat.completions.create(model="m2", messages=MESSAGES, max_tokens=4)
    assert denied.value.status_code == 403 and denied.value.code == "model_not_allowed"
    assert [m.id for m in client(proxy, BETA_KEY).models.list()] == ["m1"]
    assert [m.id for m in client(proxy, ACME_KEY).models.list()] == ["m1", "m2"]


def test_a_tenant_over_its_requests_per_minute_gets_429_with_retry_after(proxy):
    beta = client(proxy, BETA_KEY)
    statuses = []
    for _ in range(5):
        try:
            beta.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=2)
            statuses.append(200)
        except openai.RateLimitError as exc:
            statuses.append(exc.status_code)
            assert exc.code == "rate_limit_exceeded" and 1 <= int(exc.response.headers["retry-after"]) <= 120
    assert statuses.count(429) >= 2 and statuses[:1] == [200]  # 3 per minute (earlier tests may have used some)
    client(proxy, ACME_KEY).chat.completions.create(model="m1", messages=MESSAGES, max_tokens=2)  # others unaffected


async def test_the_admin_api_needs_the_admin_key_and_shows_the_fleet(proxy):
    for headers, status in (({}, 401), (admin(ACME_KEY), 401), (admin("sk-guess"), 401)):
        code, body, _ = await post_json(proxy.url + "/admin/drain", {"backend": "a"}, headers)
        assert code == status and body["error"]["code"] == "invalid_api_key"
    status, raw, _ = await _get(proxy.url + "/admin/fleet", admin())
    fleet_state = json.loads(raw)
    assert status == 200 and [b["name"] for b in fleet_state["backends"]] == ["a", "b", "c"]
    assert all(b["healthy"] and not b["draining"] and not b["ejected"] for b in fleet_state["backends"])
    status, raw, _ = await _get(proxy.url + "/admin/policy", admin())
    assert status == 200 and json.loads(raw)["name"] == "least-load"
    code, body, _ = await post_json(proxy.url + "/admin/drain", {"backend": "zz"}, admin())
    assert code == 404 and body["error"]["param"] == "backend"
    code, body, _ = await post_json(proxy.url + "/admin/drain", {"name": "a"}, admin())
    assert code == 400


async def _get(url: str, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.read(), dict(response.headers)


async def _finished(fleet: EmulatorProcess, name: str) -> int:
    status, raw, _ = await get(fleet.url(name) + "/_emulator/state")
    assert status == 200
    return sum(json.loads(raw)["finished"].values())


async def test_a_drained_backend_gets_no_new_requests_until_undrained(proxy, fleet):
    code, body, _ = await post_json(proxy.url + "/admin/drain", {"backend": "a"}, admin())
    assert code == 200 and body["draining"] is True
    try:
        before = await _finished(fleet, "a"), await _finished(fleet, "b")
        acme = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=ACME_KEY, max_retries=0)
        await asyncio.gather(
            *(acme.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=3) for _ in range(8))
        )
        after = await _finished(fleet, "a"), await _finished(fleet, "b")
        assert after[0] == before[0] and after[1] == before[1] + 8
    finally:
        code, body, _ = await post_json(proxy.url + "/admin/undrain", {"backend": "a"}, admin())
    assert code == 200 and body["draining"] is False
    await asyncio.gather(*(acme.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=3) for _ in range(8)))
    assert await _finished(fleet, "a") > after[0]


async def test_reload_applies_tenants_and_policy_and_lists_what_needs_a_restart(fleet):
    new_key = "sk-gamma-5555555555"
    with ProxyProcess(_config(fleet)) as proxy:
        config_file = proxy.workdir / "proxy.yaml"
        changed = _config(fleet, limits={"max_body_bytes": 70000})
        changed["listen"] = proxy.config["listen"]
        changed["tenants"].append({"name": "gamma", "api_keys": [hash_key(new_key)]})
        changed["policy"] = {"name": "slo"}
        config_file.write_text("backends: [")  # a broken file changes nothing
        code, body, _ = await post_json(proxy.url + "/admin/reload", {}, admin())
        assert code == 400 and body["error"]["code"] == "invalid_config"
        config_file.unlink()  # nor does a missing one
        code, body, _ = await post_json(proxy.url + "/admin/reload", {}, admin())
        assert code == 400 and body["error"]["code"] == "invalid_config"
        with pytest.raises(openai.AuthenticationError):
            client(proxy, new_key).models.list()
        config_file.write_text(yaml.safe_dump(changed))
        code, body, _ = await post_json(proxy.url + "/admin/reload", {}, admin())
        assert code == 200 and body["applied"] == ["policy", "tenants"] and body["needs_restart"] == ["limits"]
        assert [m.id for m in client(proxy, new_key).models.list()] == ["m1", "m2"]
        status, raw, _ = await _get(proxy.url + "/admin/policy", admin())
        assert status == 200 and json.loads(raw)["name"] == "slo" and json.loads(raw)["queued"] is True
        reply = client(proxy, new_key).chat.completions.create(model="m1", messages=MESSAGES, max_tokens=3)
        assert reply.choices[0].message.content  # served by the new policy
        changed["admin"] = {"api_keys": []}  # the admin key itself can be rotated away
        config_file.write_text(yaml.safe_dump(changed))
        code, body, _ = await post_json(proxy.url + "/admin/reload", {}, admin())
        assert code == 200 and body["applied"] == ["admin"]
        code, body, _ = await post_json(proxy.url + "/admin/reload", {}, admin())
        assert code == 403 and body["error"]["code"] == "admin_disabled"


def test_open_mode_warns_loudly_at_start(fleet):
    config = _config(fleet)
    config["tenants"] = [{"name": "acme"}]
    config["admin"] = {"api_keys": []}
    with ProxyProcess(config) as proxy:
        assert client(proxy, "anything").models.list().data
        time.sleep(0.2)
        assert "OPEN MODE: no API key is configured" in proxy.output()


def test_keys_never_reach_logs_traces_or_metrics(proxy):
    """Runs last in this module: every key above was used, right and wrong, with DEBUG logs and console spans."""
    with pytest.raises(openai.AuthenticationError):
        client(proxy, "sk-wrong-secret-000").models.list()
    metrics = asyncio.run(get(proxy.url + "/metrics"))[1].decode()
    time.sleep(0.5)  # the span processor batches
    output = proxy.output()
    assert "sloproxy.tenant" in output and "acme" in output  # spans and tenant names do reach the log
    for secret in (ACME_KEY, BETA_KEY, ADMIN_KEY, "sk-wrong-secret-000", "sk-not-a-key", "sk-guess"):
        for text in (output, metrics):
            assert secret not in text and hash_key(secret) not in text and hash_key(secret)[7:] not in text


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("sha256:...", "starts with 'sha256:' but is not a SHA-256 digest"),  # the README's placeholder
        ("sha256:" + "a" * 63, "starts with 'sha256:' but is not a SHA-256 digest"),
        ("SHA256:" + "a" * 64, "starts with 'sha256:' but is not a SHA-256 digest"),
        ("sha256:" + "A" * 64, "starts with 'sha256:' but is not a SHA-256 digest"),
        (ACME_KEY, "is a key in plain text: store its digest instead"),
    ],
)
def test_a_key_entry_must_be_a_digest_unless_plain_keys_are_allowed(entry, message):
    """A malformed digest is never taken as the plain key it spells (``Bearer sha256:...`` once got in)."""
    base = {"backends": [{"name": "a", "engine": "vllm", "url": "http://127.0.0.1:1", "models": ["m1"]}]}
    for extra, where in (
        ({"admin": {"api_keys": [entry]}}, "`$.admin.api_keys[0]`"),
        ({"tenants": [{"name": "x", "api_keys": [hash_key(BETA_KEY), entry]}]}, "`$.tenants[0]`.api_keys[1]"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_config({**base, **extra})
        assert f"{where} {message}" in str(caught.value), str(caught.value)
        assert entry not in str(caught.value)
        if entry.lower().startswith("sha256:"):  # no opt-in makes a broken digest a plain key
            with pytest.raises(ConfigError):
                parse_config({**base, **extra, "allow_plaintext_keys": True})
    allowed = parse_config({**base, "admin": {"api_keys": [ACME_KEY]}, "allow_plaintext_keys": True})
    assert allowed.admin.api_keys == [ACME_KEY]
