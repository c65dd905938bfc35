"""The SDK's logic without I/O, shared by the sync and the async client.

A credential request is a generator (a "flow") that yields what it needs done — an
:class:`HttpRequest` to send or a :class:`Sleep` — and is sent back the :class:`HttpResponse`
(or has the transport's :class:`BrokerUnavailable` thrown into it). ``BrokerClient`` drives flows
with httpx's sync client and ``time.sleep``, ``AsyncBrokerClient`` with the async client and
``asyncio.sleep``, so both wait, retry and interpret answers the same way.

Waiting for a human uses the broker's long-poll (``GET /v1/requests/{id}?wait=30s``): the broker
holds each poll open until the request is decided or the wait ends, so the loop below makes one
request per 30 s of waiting, never a busy loop.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import ssl
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import quote

from ._creds import (
    CredentialRequest,
    Credentials,
    LitellmKey,
    PendingApproval,
    as_repositories,
    monotonic,
)
from ._errors import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalTimeout,
    BotcredsError,
    BrokerError,
    BrokerUnavailable,
    PolicyDenied,
    SessionClosed,
)

log = logging.getLogger("botcreds")

VERSION = "0.1.0"
#: How long one long-poll asks the broker to hold the request open.
POLL_WAIT = 30.0
#: A session's background refresh polls shorter, so that leaving the session is never held up
#: for long by a poll in flight.
SESSION_POLL_WAIT = 5.0
#: Connect/write bound of every call, and the read bound of calls that do not wait.
CALL_TIMEOUT = 30.0
#: A long-poll's read bound is its wait plus this (the broker answers when the wait ends).
POLL_SLACK = 15.0
#: Consecutive transport failures tolerated while waiting for a decision.
MAX_POLL_FAILURES = 5
BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0
#: The broker's default (and GitHub's practical) upper bound on a GitHub token's ``ttl``: tokens
#: live one hour, so a token can never have more left than that when handed out.
MAX_GITHUB_TTL = 50 * 60
#: Sessions ask for tokens with this much life left, like the agent (refresh_before + 5 min).
SESSION_TTL = "45m"
#: Sessions refresh once less than this is left (capped at two-thirds of the token's life).
SESSION_REFRESH_BEFORE = 40 * 60.0
#: Refreshes are spread by up to this much (or a tenth of the refresh window, if less).
MAX_REFRESH_JITTER = 60.0

Outcome = Credentials | LitellmKey | PendingApproval


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    body: Mapping[str, Any] | None = None
    params: Mapping[str, str] | None = None
    read_timeout: float = CALL_TIMEOUT


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = HttpRequest | Sleep
Flow = Generator[Step, HttpResponse, Any]


# --- configuration -----------------------------------------------------------------------------


def broker_base_url(broker_url: str | None) -> str:
    """The broker's base URL: the argument, else ``BOTCREDS_BROKER``; ``host:port`` means http."""
    url = broker_url if broker_url is not None else os.environ.get("BOTCREDS_BROKER")
    if not url:
        raise ValueError("name the broker: broker_url=... or BOTCREDS_BROKER")
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    if not url.startswith(("http://", "https://")):
        raise ValueError("broker_url must be http:// or https://")
    return url.rstrip("/")


def auth_headers(api_key: str | None) -> dict[str, str]:
    headers = {
        "Accept": "application/json",
        "User-Agent": f"botcreds-python/{VERSION}",
    }
    if api_key is not None:
        if not api_key or not api_key.isascii() or not api_key.isprintable() or " " in api_key:
            raise ValueError("api_key must be printable ASCII without spaces")
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def plain_http_context() -> ssl.SSLContext:
    """The TLS context of a client whose broker URL is ``http://``: TLS is never used, so trust
    nothing rather than load the system's CA bundle (tens of milliseconds per client)."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def tls_context(
    mtls_dir: str | os.PathLike[str] | None,
    client_cert: str | os.PathLike[str] | None,
    client_key: str | os.PathLike[str] | None,
    ca_bundle: str | os.PathLike[str] | None,
) -> ssl.SSLContext | None:
    """The TLS context for an mTLS broker: the agent's enrolled files (``mtls_dir``: ``client.pem``
    holding key and certificate, ``ca.pem`` the broker's CA bundle), or explicit paths."""
    if mtls_dir is not None:
        client_cert = client_cert or os.path.join(mtls_dir, "client.pem")
        ca_bundle = ca_bundle or os.path.join(mtls_dir, "ca.pem")
    if client_cert is None and ca_bundle is None:
        return None
    ctx = ssl.create_default_context(cafile=os.fspath(ca_bundle) if ca_bundle else None)
    if client_cert is not None:
        ctx.load_cert_chain(os.fspath(client_cert), os.fspath(client_key) if client_key else None)
    return ctx


@dataclass(frozen=True)
class ClientOptions:
    """What a client's constructor arguments come to: the broker's base URL, how the client is
    identified (``auth``: ``api_key``, ``mtls`` or ``tailnet``, for ``repr``), the bound of each
    call, and the keyword arguments of ``httpx.Client`` / ``httpx.AsyncClient``."""

    base_url: str
    auth: str
    request_timeout: float
    # Holds the ``Authorization: Bearer`` header: kept out of ``repr``.
    http: Mapping[str, Any] = field(repr=False)


def client_options(
    broker_url: str | None,
    api_key: str | None,
    mtls_dir: str | os.PathLike[str] | None,
    client_cert: str | os.PathLike[str] | None,
    client_key: str | os.PathLike[str] | None,
    ca_bundle: str | os.PathLike[str] | None,
    request_timeout: float,
) -> ClientOptions:
    """The options of ``BrokerClient`` and ``AsyncBrokerClient`` from their constructor's
    arguments (see :class:`botcreds.BrokerClient`)."""
    base_url = broker_base_url(broker_url)
    auth = "api_key" if api_key else ("mtls" if (mtls_dir or client_cert) else "tailnet")
    ctx = tls_context(mtls_dir, client_cert, client_key, ca_bundle)
    if ctx is None and base_url.startswith("http://"):
        ctx = plain_http_context()
    http = {
        "base_url": base_url,
        "headers": auth_headers(api_key),
        "verify": ctx if ctx is not None else True,
        # httpx reads a number as the bound of connect, read, write and pool alike.
        "timeout": request_timeout,
        # Never follow a redirect (it could carry the API key elsewhere) nor take proxies or
        # certificates from the environment: the client talks to the broker it was given.
        "follow_redirects": False,
        "trust_env": False,
    }
    return ClientOptions(base_url, auth, request_timeout, http)


def request_arguments(req: HttpRequest) -> dict[str, Any]:
    """The keyword arguments of ``httpx``'s ``request`` for ``req`` (its ``timeout`` aside)."""
    return {
        "method": req.method,
        "url": req.path,
        "json": dict(req.body) if req.body is not None else None,
        "params": dict(req.params) if req.params is not None else None,
    }


def http_response(req: HttpRequest, status: int, headers: Mapping[str, str], body: bytes) -> HttpResponse:
    """The broker's answer to ``req``, as the flows take it."""
    log.debug("botcreds: %s %s -> %s", req.method, req.path, status)
    return HttpResponse(status, headers, body)


def transport_error(base_url: str, e: Exception) -> BrokerUnavailable:
    """The error of a call that got no answer (the broker unreachable, a timeout, ...)."""
    return BrokerUnavailable(
        f"the broker at {base_url} could not be reached ({type(e).__name__}: {e})", "unreachable"
    )


def invalid_answer(message: str, status: int, retry_after: float | None = None) -> BrokerUnavailable:
    """The error of an answer that is not the broker's API."""
    return BrokerUnavailable(message, "invalid_answer", status, retry_after)


def session_closed(message: str = "the session was closed") -> SessionClosed:
    return SessionClosed(message, "session_closed")


_DURATION = re.compile(r"^([0-9]{1,9})(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> int:
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"not a duration like 90s, 10m or 1h: {text!r}")
    return int(match.group(1)) * _UNIT[match.group(2)]


def ttl_text(ttl: str | float | timedelta | None, kind: str) -> str | None:
    """The ``ttl`` to send. GitHub tokens live one hour, so a GitHub ttl above 50 minutes (the
    seed's ``ttl="1h"``) asks for the most a token can have: 50 minutes."""
    if ttl is None:
        return None
    if isinstance(ttl, timedelta):
        seconds = int(ttl.total_seconds())
    elif isinstance(ttl, (int, float)):
        seconds = int(ttl)
    else:
        seconds = duration_seconds(ttl)
    if seconds <= 0:
        raise ValueError("ttl must be positive")
    if kind == "github_token" and seconds > MAX_GITHUB_TTL:
        log.debug("ttl %ss capped at %ss: GitHub tokens live one hour", seconds, MAX_GITHUB_TTL)
        seconds = MAX_GITHUB_TTL
    if isinstance(ttl, str) and seconds == duration_seconds(ttl):
        return ttl.strip()
    return f"{seconds}s"


# --- requests ----------------------------------------------------------------------------------


def github_request(
    repo: str | Sequence[str] | None,
    repositories: Sequence[str] | None,
    permissions: Sequence[str],
    reason: str | None,
    ttl: str | float | timedelta | None,
) -> CredentialRequest:
    """The request of ``get_credentials`` and ``session``."""
    return CredentialRequest(
        kind="github_token",
        repositories=as_repositories(repo, repositories),
        permissions=tuple(permissions),
        reason=reason,
        ttl=ttl_text(ttl, "github_token"),
    )


def litellm_request(
    scope: str,
    reason: str | None,
    ttl: str | float | timedelta | None,
    workspace: Mapping[str, str] | None,
) -> CredentialRequest:
    """The request of ``get_litellm_key``."""
    return CredentialRequest(
        kind="litellm_key",
        scope=scope,
        reason=reason,
        ttl=ttl_text(ttl, "litellm_key"),
        workspace=workspace,
    )


def credential_body(request: CredentialRequest, replaces: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": request.kind}
    if request.kind == "github_token":
        body["repositories"] = list(request.repositories)
        body["permissions"] = list(request.permissions)
    else:
        body["scope"] = request.scope
        if request.workspace is not None:
            body["workspace"] = dict(request.workspace)
    if request.reason is not None:
        body["reason"] = request.reason
    if request.ttl is not None:
        body["ttl"] = request.ttl
    if replaces is not None:
        body["replaces"] = replaces
    return body


def poll_request(pending: PendingApproval, wait: float) -> HttpRequest:
    path = f"/v1/requests/{quote(pending.request_id, safe='')}"
    seconds = max(1, int(wait))
    return HttpRequest("GET", path, params={"wait": f"{seconds}s"}, read_timeout=seconds + POLL_SLACK)


# --- answers -----------------------------------------------------------------------------------


def _json(resp: HttpResponse) -> Any:
    try:
        return json.loads(resp.body)
    except (ValueError, UnicodeDecodeError):
        return None


def error_for(resp: HttpResponse, request_id: str | None = None) -> BotcredsError:
    """The exception for a broker refusal (``{"error", "code", "rule"?, "retry_after"?}``)."""
    data = _json(resp)
    retry_after: float | None = None
    if isinstance(data, dict) and isinstance(data.get("retry_after"), (int, float)):
        retry_after = float(data["retry_after"])
    elif resp.headers.get("retry-after", "").isdigit():
        retry_after = float(resp.headers["retry-after"])
    if not isinstance(data, dict) or not isinstance(data.get("code"), str):
        return invalid_answer(
            f"the broker answered HTTP {resp.status} without an error body (is this the broker?)",
            resp.status,
            retry_after,
        )
    code = data["code"]
    message = str(data.get("error", code))
    rule = data.get("rule") if isinstance(data.get("rule"), str) else None
    if code == "policy_denied":
        return PolicyDenied(message, code, resp.status, retry_after, rule=rule)
    if code == "approval_denied":
        return ApprovalDenied(message, code, resp.status, retry_after, request_id=request_id)
    if code == "approval_expired":
        return ApprovalExpired(message, code, resp.status, retry_after, request_id=request_id)
    if resp.status >= 500 or resp.status in (408, 429):
        return BrokerUnavailable(message, code, resp.status, retry_after)
    return BrokerError(message, code, resp.status, retry_after)


def interpret(
    resp: HttpResponse,
    request: CredentialRequest,
    bot_id: str | None,
    request_id: str | None = None,
) -> Outcome:
    """A credential (``200``), an approval request (``202``), or the refusal raised."""
    if resp.status not in (200, 202):
        raise error_for(resp, request_id)
    data = _json(resp)
    if not isinstance(data, dict):
        raise invalid_answer(f"the broker's HTTP {resp.status} answer is not a JSON object", resp.status)
    try:
        if resp.status == 202:
            return PendingApproval.from_answer(data, request)
        kind = data.get("kind")
        outcome: Credentials | LitellmKey
        if kind == "github_token":
            outcome = Credentials(data, request)
            if request_id is not None and outcome.request_id is None:
                outcome.request_id = request_id
        elif kind == "litellm_key":
            outcome = LitellmKey(data, request)
        else:
            raise ValueError("unknown credential kind")
    except (KeyError, TypeError, ValueError) as e:
        # The message names what was wrong, never a value from the answer (it holds a secret).
        raise invalid_answer(
            f"the broker's credential answer is malformed ({type(e).__name__})", resp.status
        ) from None
    if bot_id is not None and outcome.bot and outcome.bot != bot_id:
        outcome.close()
        raise BrokerError(
            f"the broker issued this credential to bot {outcome.bot!r}, not {bot_id!r}: "
            "check the API key or the host's tailnet identity",
            "identity_mismatch",
            resp.status,
        )
    log.debug(
        "botcreds: %s issued (%s, approval %s)",
        outcome.credential_id,
        request.kind,
        getattr(outcome, "approval", "-"),
    )
    return outcome


# --- flows -------------------------------------------------------------------------------------


def credential_flow(
    request: CredentialRequest,
    *,
    bot_id: str | None,
    wait_for_approval: bool,
    timeout: float | None,
    replaces: str | None = None,
    poll_wait: float = POLL_WAIT,
) -> Flow:
    """Ask for a credential; wait through an approval request unless told not to."""
    deadline = deadline_after(timeout)
    resp = yield HttpRequest("POST", "/v1/credentials", body=credential_body(request, replaces))
    outcome = interpret(resp, request, bot_id)
    if isinstance(outcome, PendingApproval):
        log.info("botcreds: approval request %s is pending (rule %s)", outcome.request_id, outcome.rule)
        if not wait_for_approval:
            return outcome
        return (yield from wait_flow(outcome, bot_id=bot_id, deadline=deadline, poll_wait=poll_wait))
    return outcome


def refresh_flow(
    creds: object,
    *,
    bot_id: str | None,
    rejected: bool,
    wait_for_approval: bool,
    timeout: float | None,
) -> Flow:
    """The flow of ``client.refresh(creds)``: ask again for what ``creds`` was issued for (a
    rejected one ``replaces``). Checks ``creds`` now, not when the flow starts."""
    if not isinstance(creds, (Credentials, LitellmKey)):
        raise TypeError("refresh takes Credentials or a LitellmKey")
    return credential_flow(
        creds.request,
        bot_id=bot_id,
        wait_for_approval=wait_for_approval,
        timeout=timeout,
        replaces=creds.credential_id if rejected else None,
    )


def session_flow(
    request: CredentialRequest, *, bot_id: str | None, timeout: float | None, background: bool
) -> Flow:
    """A session's fetch of its token; the background refresh polls shorter (``SESSION_POLL_WAIT``)."""
    return credential_flow(
        request,
        bot_id=bot_id,
        wait_for_approval=True,
        timeout=timeout,
        poll_wait=SESSION_POLL_WAIT if background else POLL_WAIT,
    )


def deadline_after(timeout: float | None) -> float | None:
    """The monotonic deadline ``timeout`` seconds from now (``None``: no deadline)."""
    return None if timeout is None else monotonic() + timeout


def wait_flow(
    pending: PendingApproval,
    *,
    bot_id: str | None,
    deadline: float | None,
    poll_wait: float = POLL_WAIT,
) -> Flow:
    """Long-poll an approval request until it is decided or ``deadline`` (monotonic) passes."""
    failures = 0
    while True:
        remaining = None if deadline is None else deadline - monotonic()
        if remaining is not None and remaining <= 0:
            raise ApprovalTimeout(
                f"approval request {pending.request_id} is still pending after the timeout", pending
            )
        wait = poll_wait if remaining is None else max(1.0, min(poll_wait, remaining))
        try:
            resp = yield poll_request(pending, wait)
        except BrokerUnavailable as e:
            failures += 1
            if failures > MAX_POLL_FAILURES:
                raise
            delay = min(BACKOFF_CAP, BACKOFF_BASE * 2.0**failures, e.retry_after or BACKOFF_CAP)
            if remaining is not None:
                delay = min(delay, max(0.0, remaining))
            log.warning("botcreds: waiting for %s: %s; again in %.0fs", pending.request_id, e, delay)
            yield Sleep(delay)
            continue
        if resp.status == 400 and poll_wait > 1:
            err = error_for(resp)
            if err.code == "invalid_wait":
                # The broker's [approvals] max_wait is shorter than our poll: poll shorter.
                poll_wait = max(1.0, poll_wait / 2)
                continue
        outcome = interpret(resp, pending.request, bot_id, request_id=pending.request_id)
        if isinstance(outcome, PendingApproval):
            pending = outcome
            failures = 0
            continue
        return outcome


def poll_flow(pending: PendingApproval, *, bot_id: str | None) -> Flow:
    """Look once (no waiting) whether an approval request is decided."""
    resp = yield HttpRequest("GET", f"/v1/requests/{quote(pending.request_id, safe='')}")
    return interpret(resp, pending.request, bot_id, request_id=pending.request_id)


def release_flow(key: LitellmKey) -> Flow:
    resp = yield HttpRequest("POST", "/v1/credentials/release", body={"credential_id": key.credential_id})
    if resp.status != 200:
        raise error_for(resp)
    data = _json(resp)
    return data if isinstance(data, dict) else {}


def whoami_flow() -> Flow:
    resp = yield HttpRequest("GET", "/v1/whoami")
    if resp.status != 200:
        raise error_for(resp)
    data = _json(resp)
    if not isinstance(data, dict):
        raise invalid_answer("the whoami answer is not a JSON object", 200)
    return data


# --- sessions ----------------------------------------------------------------------------------


def refresh_delay(creds: Credentials, unit: float, refresh_before: float | None = None) -> float:
    """Seconds from now until a session refreshes ``creds``: ``refresh_before`` (default 40 min,
    never more than two-thirds of the token's life) before expiry, earlier by a jitter of up to
    a tenth of that window (at most a minute); ``unit`` is uniform in ``[0, 1)``."""
    lifetime = (creds.expires_at - creds.fetched_at).total_seconds()
    window = min(refresh_before or SESSION_REFRESH_BEFORE, lifetime * 2 / 3)
    jitter = min(MAX_REFRESH_JITTER, window / 10) * min(max(unit, 0.0), 1.0)
    return max(0.0, creds.seconds_left() - window - jitter)


def next_delay(
    failures: int, creds: Credentials, error: BotcredsError | None, refresh_before: float | None
) -> float:
    """How long a session's refresher waits before its next try: until ``creds`` are due for
    a refresh, or, after ``failures`` failed tries (the last one ``error``), the backoff."""
    if failures == 0:
        return refresh_delay(creds, random.random(), refresh_before)  # noqa: S311
    assert error is not None
    return retry_delay(failures, creds, error)


def retry_delay(failures: int, creds: Credentials, err: BotcredsError) -> float:
    """Backoff after a failed refresh: doubling from 1 s up to 30 s (or the broker's
    ``retry_after``), and never past half of what is left of the token's life."""
    delay = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** max(0, failures - 1))
    if err.retry_after is not None:
        delay = max(delay, min(err.retry_after, 300.0))
    left = creds.seconds_left()
    if left > 2:
        delay = min(delay, left / 2)
    return max(0.5, delay)


def expiry_margin(creds: Credentials) -> float:
    """A token with less than this left is no longer handed out by a session (a minute, or a
    quarter of a short-lived token's life)."""
    lifetime = (creds.expires_at - creds.fetched_at).total_seconds()
    return min(60.0, max(1.0, lifetime / 4))


def retire(
    current: Credentials | None, previous: Credentials | None, new: Credentials
) -> tuple[Credentials | None, bool]:
    """A session's credentials once ``new`` replaces ``current``: the previous ones to keep, and
    whether ``new`` is a new credential (a refresh). ``current`` is kept as the previous one (a
    git started a moment ago may still read its askpass helper); what is no longer kept is
    closed."""
    if current is not None and current.credential_id != new.credential_id:
        if previous is not None:
            previous.close()
        return current, True
    if current is not None:
        current.close()
    return previous, False


def leave(
    previous: Credentials | None, current: Credentials | None, error: BotcredsError | None
) -> BotcredsError:
    """Close a leaving session's credentials; what its token raises from then on (the refresh
    error it had, else ``session_closed``)."""
    for c in (previous, current):
        if c is not None:
            c.close()
    return error or session_closed()


def permanent(err: BotcredsError) -> bool:
    """Whether a refresh failure will not heal by retrying (the policy or a human said no)."""
    return isinstance(err, (PolicyDenied, ApprovalDenied, ApprovalExpired, SessionClosed)) or (
        isinstance(err, BrokerError) and err.status in (400, 401, 403, 404)
    )


def session_token(creds: Credentials | None, error: BotcredsError | None) -> str:
    """What ``session.token`` gives: the live token; the refresh error when the policy said no,
    or when the token is (nearly) expired and refreshing failed."""
    if creds is None:
        raise error or session_closed("the session is not open")
    if error is not None and (permanent(error) or creds.seconds_left() < expiry_margin(creds)):
        raise error
    return creds.token
