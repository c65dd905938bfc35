"""``BrokerClient``: the blocking client (httpx), and ``Session``, its refreshing token holder."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal, TypeVar, cast, overload

import httpx

from . import _core
from ._creds import (
    CredentialRequest,
    Credentials,
    LitellmKey,
    PendingApproval,
)
from ._errors import BotcredsError, BrokerUnavailable, SessionClosed

log = logging.getLogger("botcreds")

T = TypeVar("T")
#: ``get_credentials``'s default wait for a human, in seconds.
DEFAULT_APPROVAL_TIMEOUT = 600.0


class BrokerClient:
    """A client of the botcreds broker (blocking).

    ``broker_url`` defaults to ``BOTCREDS_BROKER``. The caller is identified by ``api_key``
    (``Authorization: Bearer``), by a client certificate (``mtls_dir``: the agent's enrolled
    ``client.pem`` and ``ca.pem``, or ``client_cert``/``client_key``/``ca_bundle``), or — with
    neither — by its tailnet identity. ``bot_id``, when given, is checked against the bot the
    broker issued each credential to (``identity_mismatch`` if they differ).
    """

    def __init__(
        self,
        broker_url: str | None = None,
        bot_id: str | None = None,
        api_key: str | None = None,
        *,
        mtls_dir: str | os.PathLike[str] | None = None,
        client_cert: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
        ca_bundle: str | os.PathLike[str] | None = None,
        request_timeout: float = _core.CALL_TIMEOUT,
    ) -> None:
        options = _core.client_options(
            broker_url, api_key, mtls_dir, client_cert, client_key, ca_bundle, request_timeout
        )
        self.broker_url = options.base_url
        self.bot_id = bot_id
        self._auth = options.auth
        self._request_timeout = options.request_timeout
        self._http = httpx.Client(**options.http)

    # --- transport -----------------------------------------------------------------------------

    def _send(self, req: _core.HttpRequest) -> _core.HttpResponse:
        try:
            r = self._http.request(
                **_core.request_arguments(req),
                timeout=httpx.Timeout(self._request_timeout, read=req.read_timeout),
            )
        except httpx.HTTPError as e:
            raise _core.transport_error(self.broker_url, e) from None
        return _core.http_response(req, r.status_code, r.headers, r.content)

    def _drive(self, flow: _core.Flow, stop: threading.Event | None = None) -> Any:
        """Run a flow of ``_core`` to its end: send its requests, sleep its sleeps. A set
        ``stop`` (a session closing) ends it between steps."""
        try:
            step = next(flow)
            while True:
                if stop is not None and stop.is_set():
                    flow.close()
                    raise _core.session_closed()
                if isinstance(step, _core.Sleep):
                    if stop is not None:
                        stop.wait(step.seconds)
                    else:
                        time.sleep(step.seconds)
                    step = next(flow)
                    continue
                try:
                    resp = self._send(step)
                except BrokerUnavailable as e:
                    step = flow.throw(e)
                else:
                    step = flow.send(resp)
        except StopIteration as done:
            return done.value

    # --- credentials ---------------------------------------------------------------------------

    @overload
    def get_credentials(
        self,
        repo: str | Sequence[str] | None = ...,
        permissions: Sequence[str] = ...,
        reason: str | None = ...,
        wait_for_approval: Literal[True] = ...,
        ttl: str | float | timedelta | None = ...,
        timeout: float | None = ...,
        *,
        repositories: Sequence[str] | None = ...,
    ) -> Credentials: ...

    @overload
    def get_credentials(
        self,
        repo: str | Sequence[str] | None,
        permissions: Sequence[str],
        reason: str | None,
        wait_for_approval: bool,
        ttl: str | float | timedelta | None = ...,
        timeout: float | None = ...,
        *,
        repositories: Sequence[str] | None = ...,
    ) -> Credentials | PendingApproval: ...

    @overload
    def get_credentials(
        self,
        repo: str | Sequence[str] | None = ...,
        permissions: Sequence[str] = ...,
        reason: str | None = ...,
        *,
        wait_for_approval: bool,
        ttl: str | float | timedelta | None = ...,
        timeout: float | None = ...,
        repositories: Sequence[str] | None = ...,
    ) -> Credentials | PendingApproval: ...

    def get_credentials(
        self,
        repo: str | Sequence[str] | None = None,
        permissions: Sequence[str] = (),
        reason: str | None = None,
        wait_for_approval: bool = True,
        ttl: str | float | timedelta | None = None,
        timeout: float | None = DEFAULT_APPROVAL_TIMEOUT,
        *,
        repositories: Sequence[str] | None = None,
    ) -> Credentials | PendingApproval:
        """A GitHub token for ``repo`` (or ``repositories``, all of one owner) with ``permissions``
        (``"contents:write"``, ...). When the policy wants a human, waits up to ``timeout`` seconds
        (``None``: until the broker decides) for the decision — or, with
        ``wait_for_approval=False``, returns the :class:`PendingApproval` at once."""
        request = _core.github_request(repo, repositories, permissions, reason, ttl)
        return cast(
            "Credentials | PendingApproval",
            self._drive(
                _core.credential_flow(
                    request,
                    bot_id=self.bot_id,
                    wait_for_approval=wait_for_approval,
                    timeout=timeout,
                )
            ),
        )

    @overload
    def get_litellm_key(
        self,
        scope: str,
        reason: str | None = ...,
        wait_for_approval: Literal[True] = ...,
        ttl: str | float | timedelta | None = ...,
        timeout: float | None = ...,
        *,
        workspace: Mapping[str, str] | None = ...,
    ) -> LitellmKey: ...

    @overload
    def get_litellm_key(
        self,
        scope: str,
        reason: str | None,
        wait_for_approval: bool,
        ttl: str | float | timedelta | None = ...,
        timeout: float | None = ...,
        *,
        workspace: Mapping[str, str] | None = ...,
    ) -> LitellmKey | PendingApproval: ...

    @overload
    def get_litellm_key(
        self,
        scope: str,
        reason: str | None = ...,
        *,
        wait_for_approval: bool,
        ttl: str | float | timedelta | None = ...,
        timeout: float | None = ...,
        workspace: Mapping[str, str] | None = ...,
    ) -> LitellmKey | PendingApproval: ...

    def get_litellm_key(
        self,
        scope: str,
        reason: str | None = None,
        wait_for_approval: bool = True,
        ttl: str | float | timedelta | None = None,
        timeout: float | None = DEFAULT_APPROVAL_TIMEOUT,
        *,
        workspace: Mapping[str, str] | None = None,
    ) -> LitellmKey | PendingApproval:
        """A LiteLLM virtual key for ``scope`` (``"agent:review"``), waiting like
        :meth:`get_credentials`."""
        request = _core.litellm_request(scope, reason, ttl, workspace)
        return cast(
            "LitellmKey | PendingApproval",
            self._drive(
                _core.credential_flow(
                    request,
                    bot_id=self.bot_id,
                    wait_for_approval=wait_for_approval,
                    timeout=timeout,
                )
            ),
        )

    def refresh(
        self,
        creds: T,
        *,
        rejected: bool = False,
        wait_for_approval: bool = True,
        timeout: float | None = DEFAULT_APPROVAL_TIMEOUT,
    ) -> T:
        """Ask again for what ``creds`` (a :class:`Credentials` or :class:`LitellmKey`) was issued
        for. The broker answers the same credential while it has at least the request's ``ttl``
        left, else a new one. ``rejected=True`` says the token was refused upstream (GitHub
        answered 401 with it): the broker then mints a new one and revokes the old
        (``replaces``; rate limited by the broker)."""
        flow = _core.refresh_flow(
            creds,
            bot_id=self.bot_id,
            rejected=rejected,
            wait_for_approval=wait_for_approval,
            timeout=timeout,
        )
        return cast(T, self._drive(flow))

    def wait(
        self, pending: PendingApproval, timeout: float | None = DEFAULT_APPROVAL_TIMEOUT
    ) -> Credentials | LitellmKey:
        """Wait (long-polling) for a human to decide ``pending``."""
        deadline = _core.deadline_after(timeout)
        return cast(
            "Credentials | LitellmKey",
            self._drive(_core.wait_flow(pending, bot_id=self.bot_id, deadline=deadline)),
        )

    def poll(self, pending: PendingApproval) -> Credentials | LitellmKey | PendingApproval:
        """Look once whether ``pending`` is decided: the credential, or the request again."""
        return cast(
            "Credentials | LitellmKey | PendingApproval",
            self._drive(_core.poll_flow(pending, bot_id=self.bot_id)),
        )

    def release(self, key: LitellmKey) -> Mapping[str, Any]:
        """Give a LiteLLM key back: the broker deletes it in LiteLLM at once."""
        return cast("Mapping[str, Any]", self._drive(_core.release_flow(key)))

    def whoami(self) -> Mapping[str, Any]:
        """How the broker identifies this client (``bot``, ``via``, ...)."""
        return cast("Mapping[str, Any]", self._drive(_core.whoami_flow()))

    def session(
        self,
        repo: str | Sequence[str] | None = None,
        permissions: Sequence[str] = (),
        reason: str | None = None,
        ttl: str | float | timedelta | None = _core.SESSION_TTL,
        timeout: float | None = DEFAULT_APPROVAL_TIMEOUT,
        *,
        repositories: Sequence[str] | None = None,
        refresh_before: float | None = None,
    ) -> Session:
        """A context manager whose ``.token`` stays valid: a background thread refreshes the token
        before it expires (see :class:`Session`)."""
        request = _core.github_request(repo, repositories, permissions, reason, ttl)
        return Session(self, request, timeout, refresh_before)

    # --- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BrokerClient(broker_url={self.broker_url!r}, bot_id={self.bot_id!r}, auth={self._auth!r})"


class Session:
    """A GitHub token kept valid in the background.

    Entering fetches the token (waiting for approval like ``get_credentials``) and starts a
    daemon thread that refreshes it ``refresh_before`` (default 40 min, at most two-thirds of the
    token's life) before expiry, jittered. ``token`` / ``credentials`` always give the current
    one. A refresh that fails is retried with backoff; its error is raised on access once the
    token is about to expire — at once if the policy or a human refused. Exiting stops and joins
    the thread and removes the askpass helpers.
    """

    def __init__(
        self,
        client: BrokerClient,
        request: CredentialRequest,
        timeout: float | None,
        refresh_before: float | None,
    ) -> None:
        self._client = client
        self._request = request
        self._timeout = timeout
        self._refresh_before = refresh_before
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._creds: Credentials | None = None
        self._previous: Credentials | None = None
        self._error: BotcredsError | None = None
        self._thread: threading.Thread | None = None
        #: How many times the token was refreshed (for monitoring).
        self.refreshes = 0

    def _fetch(self, background: bool = False) -> Credentials:
        flow = _core.session_flow(
            self._request, bot_id=self._client.bot_id, timeout=self._timeout, background=background
        )
        outcome = self._client._drive(flow, self._stop if background else None)
        assert isinstance(outcome, Credentials)
        return outcome

    def _swap(self, new: Credentials) -> None:
        with self._lock:
            self._previous, refreshed = _core.retire(self._creds, self._previous, new)
            self._creds = new
            if refreshed:
                self.refreshes += 1
            self._error = None

    def __enter__(self) -> Session:
        self._swap(self._fetch())
        self._thread = threading.Thread(target=self._run, name="botcreds-session", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        failures = 0
        while True:
            with self._lock:
                creds = self._creds
            assert creds is not None
            delay = _core.next_delay(failures, creds, self._error, self._refresh_before)
            if self._stop.wait(delay):
                return
            try:
                new = self._fetch(background=True)
            except SessionClosed:
                return
            except BotcredsError as e:
                failures += 1
                with self._lock:
                    self._error = e
                log.warning("botcreds: refreshing %s failed: %s", creds.credential_id, e)
                if _core.permanent(e):
                    return
                continue
            if new.credential_id == creds.credential_id:
                # The broker handed back the same token (it still had the ttl left): try again
                # later rather than at once.
                failures = 0
                with self._lock:
                    self._error = None
                if self._stop.wait(max(1.0, new.seconds_left() / 10)):
                    return
                continue
            failures = 0
            self._swap(new)
            log.info("botcreds: refreshed %s -> %s", creds.credential_id, new.credential_id)

    @property
    def credentials(self) -> Credentials:
        """The current credentials (raises the refresh error when they cannot be kept valid)."""
        with self._lock:
            creds, error = self._creds, self._error
        _core.session_token(creds, error)
        assert creds is not None
        if error is None and creds.seconds_left() < _core.expiry_margin(creds):
            # The background refresh is late (a suspended process): refresh here.
            self._swap(self._fetch())
            with self._lock:
                assert self._creds is not None
                return self._creds
        return creds

    @property
    def token(self) -> str:
        """The current token, always valid for at least a minute (or a quarter of its life)."""
        return self.credentials.token

    @property
    def git_askpass_helper(self) -> str:
        return self.credentials.git_askpass_helper

    @property
    def repo_url(self) -> str:
        return self.credentials.repo_url

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        with self._lock:
            self._error = _core.leave(self._previous, self._creds, self._error)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        with self._lock:
            creds = self._creds
        return f"Session(credentials={creds!r}, refreshes={self.refreshes})"
