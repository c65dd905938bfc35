"""Exceptions of the SDK: one per way a credential request can end without a credential.

Every exception carries the broker's stable error ``code`` (docs/api.md), so callers branch on
``code`` or the class, never on messages. Messages come from the broker's ``error`` field, which
never holds a secret; the SDK never puts a token into an exception.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._creds import PendingApproval


class BotcredsError(Exception):
    """Any refusal or failure of a broker call.

    ``code`` is the broker's error code (or one of the SDK's own: ``unreachable``,
    ``invalid_answer``, ``approval_timeout``, ``identity_mismatch``); ``status`` the HTTP status
    (``None`` when there was no answer); ``retry_after`` seconds, when the broker named them.
    """

    def __init__(
        self,
        message: str,
        code: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code)
        self.message = message
        self.code = code
        self.status = status
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status!r}, message={self.message!r})"


class PolicyDenied(BotcredsError):
    """The policy refuses the request (``policy_denied``); ``rule`` names the deciding rule."""

    def __init__(
        self,
        message: str,
        code: str,
        status: int | None = None,
        retry_after: float | None = None,
        rule: str | None = None,
    ) -> None:
        super().__init__(message, code, status, retry_after)
        self.rule = rule

    def __str__(self) -> str:
        rule = f", rule {self.rule}" if self.rule else ""
        return f"{self.message} ({self.code}{rule})"


class _ApprovalEnded(BotcredsError):
    """An approval request that ended without a credential; ``request_id`` names it."""

    def __init__(
        self,
        message: str,
        code: str,
        status: int | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, code, status, retry_after)
        self.request_id = request_id


class ApprovalDenied(_ApprovalEnded):
    """A human (or a policy reload) denied the approval request (``approval_denied``)."""


class ApprovalExpired(_ApprovalEnded):
    """Nobody decided the approval request in time, or its grant ended (``approval_expired``)."""


class ApprovalTimeout(BotcredsError):
    """The caller's ``timeout`` passed while the approval request was still pending
    (``approval_timeout``, the SDK's code). ``pending`` is the request: wait for it again with
    ``client.wait(err.pending)``; it stays pending at the broker until decided or expired."""

    def __init__(self, message: str, pending: PendingApproval) -> None:
        super().__init__(message, "approval_timeout", 202)
        self.pending = pending
        self.request_id = pending.request_id


class BrokerUnavailable(BotcredsError):
    """The broker could not be reached, is overloaded or failing (``5xx``, ``429``, ``408``), or
    answered something that is not its API. Worth retrying later; ``retry_after`` when known."""


class BrokerError(BotcredsError):
    """Any other refusal: a bad request (``400``), unknown or wrong API key (``401``), an
    unknown request id (``404``), ... — ``code`` says which."""


class SessionClosed(BotcredsError):
    """The session was left (``session_closed``): its token is no longer kept valid."""
