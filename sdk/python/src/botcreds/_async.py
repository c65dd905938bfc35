"""``AsyncBrokerClient``: the asyncio twin of ``BrokerClient``, driving the same flows of
``_core`` with httpx's async client; ``AsyncSession`` refreshes in an asyncio task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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
from ._errors import BotcredsError, BrokerUnavailable
from ._sync import DEFAULT_APPROVAL_TIMEOUT

log = logging.getLogger("botcreds")

T = TypeVar("T")


class AsyncBrokerClient:
    """The asyncio client: the same constructor, methods and errors as :class:`BrokerClient`,
    with ``await``; ``session()`` is an ``async with`` context manager."""

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
        self._http = httpx.AsyncClient(**options.http)

    async def _send(self, req: _core.HttpRequest) -> _core.HttpResponse:
        try:
            r = await self._http.request(
                **_core.request_arguments(req),
                timeout=httpx.Timeout(self._request_timeout, read=req.read_timeout),
            )
        except httpx.HTTPError as e:
            raise _core.transport_error(self.broker_url, e) from None
        return _core.http_response(req, r.status_code, r.headers, r.content)

    async def _drive(self, flow: _core.Flow) -> Any:
        """Run a flow of ``_core`` to its end (cancelling the task ends it at once)."""
        try:
            step = next(flow)
            while True:
                if isinstance(step, _core.Sleep):
                    await asyncio.sleep(step.seconds)
                    step = next(flow)
                    continue
                try:
                    resp = await self._send(step)
                except BrokerUnavailable as e:
                    step = flow.throw(e)
                else:
                    step = flow.send(resp)
        except StopIteration as done:
            return done.value

    @overload
    async def get_credentials(
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
    async def get_credentials(
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
    async def get_credentials(
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

    async def get_credentials(
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
        """See :meth:`BrokerClient.get_credentials`."""
        request = _core.github_request(repo, repositories, permissions, reason, ttl)
        flow = _core.credential_flow(
            request, bot_id=self.bot_id, wait_for_approval=wait_for_approval, timeout=timeout
        )
        return cast("Credentials | PendingApproval", await self._drive(flow))

    @overload
    async def get_litellm_key(
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
    async def get_litellm_key(
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
    async def get_litellm_key(
        self,
        scope: str,
        reason: str | None = ...,
        *,
        wait_for_approval: bool,
        ttl: str | float | timedelta | None = ...,
        timeout: float | None = ...,
        workspace: Mapping[str, str] | None = ...,
    ) -> LitellmKey | PendingApproval: ...

    async def get_litellm_key(
        self,
        scope: str,
        reason: str | None = None,
        wait_for_approval: bool = True,
        ttl: str | float | timedelta | None = None,
        timeout: float | None = DEFAULT_APPROVAL_TIMEOUT,
        *,
        workspace: Mapping[str, str] | None = None,
    ) -> LitellmKey | PendingApproval:
        """See :meth:`BrokerClient.get_litellm_key`."""
        request = _core.litellm_request(scope, reason, ttl, workspace)
        flow = _core.credential_flow(
            request, bot_id=self.bot_id, wait_for_approval=wait_for_approval, timeout=timeout
        )
        return cast("LitellmKey | PendingApproval", await self._drive(flow))

    async def refresh(
        self,
        creds: T,
        *,
        rejected: bool = False,
        wait_for_approval: bool = True,
        timeout: float | None = DEFAULT_APPROVAL_TIMEOUT,
    ) -> T:
        """See :meth:`BrokerClient.refresh`."""
        flow = _core.refresh_flow(
            creds,
            bot_id=self.bot_id,
            rejected=rejected,
            wait_for_approval=wait_for_approval,
            timeout=timeout,
        )
        return cast(T, await self._drive(flow))

    async def wait(
        self, pending: PendingApproval, timeout: float | None = DEFAULT_APPROVAL_TIMEOUT
    ) -> Credentials | LitellmKey:
        """See :meth:`BrokerClient.wait`."""
        deadline = _core.deadline_after(timeout)
        flow = _core.wait_flow(pending, bot_id=self.bot_id, deadline=deadline)
        return cast("Credentials | LitellmKey", await self._drive(flow))

    async def poll(self, pending: PendingApproval) -> Credentials | LitellmKey | PendingApproval:
        """See :meth:`BrokerClient.poll`."""
        flow = _core.poll_flow(pending, bot_id=self.bot_id)
        return cast("Credentials | LitellmKey | PendingApproval", await self._drive(flow))

    async def release(self, key: LitellmKey) -> Mapping[str, Any]:
        """See :meth:`BrokerClient.release`."""
        return cast("Mapping[str, Any]", await self._drive(_core.release_flow(key)))

    async def whoami(self) -> Mapping[str, Any]:
        return cast("Mapping[str, Any]", await self._drive(_core.whoami_flow()))

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
    ) -> AsyncSession:
        """``async with client.session(...) as s:`` — see :class:`botcreds.Session`."""
        request = _core.github_request(repo, repositories, permissions, reason, ttl)
        return AsyncSession(self, request, timeout, refresh_before)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"AsyncBrokerClient(broker_url={self.broker_url!r}, bot_id={self.bot_id!r}, auth={self._auth!r})"
        )


class AsyncSession:
    """The asyncio :class:`botcreds.Session`: a task refreshes the token; leaving cancels and
    awaits it. ``token`` is a property (no I/O); ``await s.current()`` also refreshes a token
    the task has not refreshed in time."""

    def __init__(
        self,
        client: AsyncBrokerClient,
        request: CredentialRequest,
        timeout: float | None,
        refresh_before: float | None,
    ) -> None:
        self._client = client
        self._request = request
        self._timeout = timeout
        self._refresh_before = refresh_before
        self._creds: Credentials | None = None
        self._previous: Credentials | None = None
        self._error: BotcredsError | None = None
        self._task: asyncio.Task[None] | None = None
        self.refreshes = 0

    async def _fetch(self, background: bool = False) -> Credentials:
        flow = _core.session_flow(
            self._request, bot_id=self._client.bot_id, timeout=self._timeout, background=background
        )
        outcome = await self._client._drive(flow)
        assert isinstance(outcome, Credentials)
        return outcome

    def _swap(self, new: Credentials) -> None:
        self._previous, refreshed = _core.retire(self._creds, self._previous, new)
        self._creds = new
        if refreshed:
            self.refreshes += 1
        self._error = None

    async def __aenter__(self) -> AsyncSession:
        self._swap(await self._fetch())
        self._task = asyncio.create_task(self._run(), name="botcreds-session")
        return self

    async def _run(self) -> None:
        failures = 0
        while True:
            creds = self._creds
            assert creds is not None
            delay = _core.next_delay(failures, creds, self._error, self._refresh_before)
            await asyncio.sleep(delay)
            try:
                new = await self._fetch(background=True)
            except BotcredsError as e:
                failures += 1
                self._error = e
                log.warning("botcreds: refreshing %s failed: %s", creds.credential_id, e)
                if _core.permanent(e):
                    return
                continue
            failures = 0
            if new.credential_id == creds.credential_id:
                self._error = None
                await asyncio.sleep(max(1.0, new.seconds_left() / 10))
                continue
            self._swap(new)
            log.info("botcreds: refreshed %s -> %s", creds.credential_id, new.credential_id)

    @property
    def credentials(self) -> Credentials:
        """The current credentials (raises the refresh error when they cannot be kept valid)."""
        _core.session_token(self._creds, self._error)
        assert self._creds is not None
        return self._creds

    @property
    def token(self) -> str:
        return self.credentials.token

    async def current(self) -> Credentials:
        """The current credentials, refreshed here if the task is late."""
        creds = self.credentials
        if self._error is None and creds.seconds_left() < _core.expiry_margin(creds):
            self._swap(await self._fetch())
            return self.credentials
        return creds

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._error = _core.leave(self._previous, self._creds, self._error)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncSession(credentials={self._creds!r}, refreshes={self.refreshes})"
