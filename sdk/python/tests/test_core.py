"""The sans-I/O core on its own: ttl handling, answer interpretation, the wait loop's requests and
the refresh schedule."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from botcreds import (
    ApprovalTimeout,
    BrokerClient,
    BrokerUnavailable,
    CredentialRequest,
    Credentials,
    PendingApproval,
    PolicyDenied,
    _core,
)

REQ = CredentialRequest(kind="github_token", repositories=("o/r",), permissions=("contents:read",))


def answer(status: int, body: object, headers: dict[str, str] | None = None) -> _core.HttpResponse:
    return _core.HttpResponse(status, headers or {}, json.dumps(body).encode())


def creds(lifetime: float) -> Credentials:
    now = datetime.now(timezone.utc)
    expires = (now + timedelta(seconds=lifetime)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    c = Credentials({"token": "ghs_x", "credential_id": "tok_1", "expires_at": expires}, REQ)
    c.fetched_at = now
    return c


def test_ttls() -> None:
    assert _core.ttl_text(None, "github_token") is None
    assert _core.ttl_text("10m", "github_token") == "10m"
    # The seed's ttl="1h" asks for the most a GitHub token can have left.
    assert _core.ttl_text("1h", "github_token") == "3000s"
    assert _core.ttl_text("2h", "litellm_key") == "2h"
    assert _core.ttl_text(timedelta(minutes=5), "github_token") == "300s"
    with pytest.raises(ValueError, match="duration"):
        _core.ttl_text("soon", "github_token")


def test_broker_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOTCREDS_BROKER", "creds.example.ts.net:8443/")
    assert BrokerClient().broker_url == "http://creds.example.ts.net:8443"
    monkeypatch.delenv("BOTCREDS_BROKER")
    with pytest.raises(ValueError, match="BOTCREDS_BROKER"):
        BrokerClient()


def test_errors_map_to_classes() -> None:
    denied = _core.error_for(answer(403, {"error": "no", "code": "policy_denied", "rule": "bots.b.deny[0]"}))
    assert isinstance(denied, PolicyDenied) and denied.rule == "bots.b.deny[0]"
    busy = _core.error_for(answer(503, {"error": "busy", "code": "overloaded", "retry_after": 2}))
    assert isinstance(busy, BrokerUnavailable) and busy.retry_after == 2
    html = _core.error_for(_core.HttpResponse(502, {}, b"<html>bad gateway</html>"))
    assert isinstance(html, BrokerUnavailable) and html.code == "invalid_answer"


def test_a_malformed_credential_never_quotes_the_answer() -> None:
    bad = answer(200, {"kind": "github_token", "token": "ghs_secret value", "credential_id": "t"})
    with pytest.raises(BrokerUnavailable) as err:
        _core.interpret(bad, REQ, None)
    assert "ghs_secret" not in str(err.value) and "ghs_secret" not in repr(err.value)


def test_the_wait_loop_long_polls_and_times_out() -> None:
    flow = _core.credential_flow(REQ, bot_id=None, wait_for_approval=True, timeout=0.5)
    post = next(flow)
    assert isinstance(post, _core.HttpRequest) and post.method == "POST"
    assert post.body == {"kind": "github_token", "repositories": ["o/r"], "permissions": ["contents:read"]}
    poll = flow.send(answer(202, {"request_id": "apr_abcdefgh", "state": "PENDING"}))
    assert isinstance(poll, _core.HttpRequest)
    assert (poll.method, poll.path, poll.params) == ("GET", "/v1/requests/apr_abcdefgh", {"wait": "1s"})
    # A broker whose max_wait is shorter makes the loop poll shorter, not fail.
    again = flow.send(answer(400, {"error": "too long", "code": "invalid_wait"}))
    assert isinstance(again, _core.HttpRequest) and again.method == "GET"
    with pytest.raises(ApprovalTimeout) as err:
        while True:
            flow.send(answer(202, {"request_id": "apr_abcdefgh", "state": "PENDING"}))
    assert isinstance(err.value.pending, PendingApproval)


def test_the_refresh_schedule() -> None:
    hour = creds(3600)
    for unit in (0.0, 0.5, 0.999):
        delay = _core.refresh_delay(hour, unit)
        # 40 minutes before expiry (capped at two-thirds of the life), minus up to a minute.
        assert 20 * 60 - 61 <= delay <= 20 * 60 + 1
    short = creds(30)
    assert 8 <= _core.refresh_delay(short, 0.0) <= 10.5
    assert 6 <= _core.refresh_delay(short, 0.999) <= 10.5
    assert _core.expiry_margin(hour) == 60
    assert _core.expiry_margin(short) == pytest.approx(7.5, abs=0.1)
