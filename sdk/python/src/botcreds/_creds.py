"""What the broker hands out: GitHub credentials, LiteLLM keys, and pending approval requests.

Secrets (the token, the key) are held in private attributes and reached through properties; no
``repr``, ``str`` or exception of these objects shows them. The git askpass helper is a 0700
script in a private 0700 directory, removed on ``close()``, on garbage collection, or at exit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

#: ``expires_soon()``'s default margin, in seconds.
DEFAULT_EXPIRES_SOON = 300.0


@dataclass(frozen=True)
class Attribution:
    """Who commits made with the token are attributed to (the seed's ``attribution``)."""

    name: str
    email: str
    trailer: str


@dataclass(frozen=True)
class CredentialRequest:
    """What was asked for, kept so that ``refresh`` can ask again for the same thing."""

    kind: str
    repositories: tuple[str, ...] = ()
    permissions: tuple[str, ...] = ()
    scope: str | None = None
    reason: str | None = None
    ttl: str | None = None
    workspace: Mapping[str, str] | None = None


def parse_time(value: object) -> datetime:
    """An RFC 3339 time from the broker (``2026-02-17T15:00:00Z``), as an aware datetime."""
    if not isinstance(value, str):
        raise ValueError("not a time")
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError("a time without a zone")
    return parsed


def _seconds_left(expires_at: datetime) -> float:
    return (expires_at - datetime.now(timezone.utc)).total_seconds()


def _strip_userinfo(url: str) -> str:
    """A clone URL without the ``x-access-token:TOKEN@`` part."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Credentials:
    """A GitHub installation token with what the broker said about it.

    ``token`` is the secret; ``repo_url`` (``repo_urls`` for several repositories) the clone URL
    *without* the token, for use with ``git_askpass_helper``; ``attribution`` the commit identity.
    """

    __slots__ = (
        "__weakref__",
        "_askpass_dir",
        "_finalizer",
        "_token",
        "approval",
        "attribution",
        "bot",
        "credential_id",
        "expires_at",
        "fetched_at",
        "permissions",
        "repo_url",
        "repo_urls",
        "repositories",
        "request",
        "request_id",
    )

    def __init__(self, answer: Mapping[str, Any], request: CredentialRequest) -> None:
        token = answer["token"]
        if not isinstance(token, str) or not token or not token.isascii() or not token.isprintable():
            raise ValueError("the token is not printable ASCII")
        if "'" in token or " " in token:
            raise ValueError("the token has characters a token never has")
        self._token = token
        self.credential_id: str = str(answer["credential_id"])
        self.expires_at: datetime = parse_time(answer["expires_at"])
        self.fetched_at: datetime = datetime.now(timezone.utc)
        self.repositories: tuple[str, ...] = tuple(str(r) for r in answer.get("repositories", []))
        perms = answer.get("permissions") or {}
        self.permissions: dict[str, str] = {str(k): str(v) for k, v in dict(perms).items()}
        self.approval: str = str(answer.get("approval", ""))
        self.bot: str = str(answer.get("bot", ""))
        self.request_id: str | None = answer.get("request_id")
        git = answer.get("git") or {}
        urls = git.get("clone_urls") or ([git["clone_url"]] if git.get("clone_url") else [])
        self.repo_urls: tuple[str, ...] = tuple(_strip_userinfo(str(u)) for u in urls)
        self.repo_url: str = self.repo_urls[0] if self.repo_urls else ""
        attribution = answer.get("attribution") or {}
        self.attribution = Attribution(
            name=str(attribution.get("name", "")),
            email=str(attribution.get("email", "")),
            trailer=str(attribution.get("trailer", "")),
        )
        self.request = request
        self._askpass_dir: str | None = None
        self._finalizer: weakref.finalize[[str], Credentials] | None = None

    @property
    def token(self) -> str:
        """The installation token (``ghs_...``): for ``Authorization: token ...``, PyGithub, ``gh``."""
        return self._token

    @property
    def git_askpass_helper(self) -> str:
        """Path of an executable script for ``GIT_ASKPASS``: answers ``x-access-token`` for the
        username and the token for the password. Created on first use in a private directory
        (mode 0700, the script 0700) that ``close()`` or the end of the process removes."""
        if self._askpass_dir is None:
            directory = tempfile.mkdtemp(prefix="botcreds-askpass-")
            os.chmod(directory, 0o700)
            self._finalizer = weakref.finalize(self, _remove_dir, directory)
            path = os.path.join(directory, "askpass")
            script = (
                "#!/bin/sh\n"
                "# git askpass helper written by the botcreds SDK; removed when the credentials close.\n"
                'case "$1" in\n'
                "  Username*) echo x-access-token ;;\n"
                f"  *) printf '%s\\n' '{self._token}' ;;\n"
                "esac\n"
            )
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
            with os.fdopen(fd, "w") as f:
                f.write(script)
            os.chmod(path, 0o700)
            self._askpass_dir = directory
        return os.path.join(self._askpass_dir, "askpass")

    def seconds_left(self) -> float:
        """Seconds until the token expires (negative once it has)."""
        return _seconds_left(self.expires_at)

    def expires_soon(self, within: float = DEFAULT_EXPIRES_SOON) -> bool:
        """Whether less than ``within`` seconds (default 5 minutes) of the token's life are left."""
        return self.seconds_left() < within

    def close(self) -> None:
        """Remove the askpass helper (if one was written). The token itself stays valid until it
        expires; ask the broker's admins to revoke it if it must die sooner."""
        if self._finalizer is not None:
            self._finalizer()
        self._askpass_dir = None

    def __enter__(self) -> Credentials:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Credentials(credential_id={self.credential_id!r}, repositories={list(self.repositories)!r}, "
            f"permissions={self.permissions!r}, expires_at={self.expires_at.isoformat()!r}, "
            f"approval={self.approval!r}, bot={self.bot!r})"
        )

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("Credentials hold a secret and are not pickled")


class LitellmKey:
    """A LiteLLM virtual key: ``key`` is the secret (``sk-...``), ``base_url`` the proxy."""

    __slots__ = (
        "_key",
        "base_url",
        "bot",
        "budget_period",
        "budget_usd",
        "credential_id",
        "expires_at",
        "fetched_at",
        "models",
        "name",
        "request",
        "rpm_limit",
        "scope",
    )

    def __init__(self, answer: Mapping[str, Any], request: CredentialRequest) -> None:
        key = answer["key"]
        if not isinstance(key, str) or not key or not key.isascii() or not key.isprintable():
            raise ValueError("the key is not printable ASCII")
        self._key = key
        self.credential_id: str = str(answer["credential_id"])
        self.name: str = str(answer.get("name", ""))
        self.scope: str = str(answer.get("scope", ""))
        self.budget_usd: float | None = answer.get("budget_usd")
        self.budget_period: str | None = answer.get("budget_period")
        self.rpm_limit: int | None = answer.get("rpm_limit")
        models = answer.get("models") or []
        self.models: tuple[str, ...] = tuple(str(m) for m in models)
        self.expires_at: datetime = parse_time(answer["expires_at"])
        self.fetched_at: datetime = datetime.now(timezone.utc)
        self.base_url: str = str(answer.get("base_url", ""))
        self.bot: str = str(answer.get("bot", ""))
        self.request = request

    @property
    def key(self) -> str:
        """The virtual key, for ``Authorization: Bearer`` at ``base_url``."""
        return self._key

    @property
    def token(self) -> str:
        """The same as ``key``, so code written for ``Credentials`` works with keys too."""
        return self._key

    def seconds_left(self) -> float:
        return _seconds_left(self.expires_at)

    def expires_soon(self, within: float = DEFAULT_EXPIRES_SOON) -> bool:
        return self.seconds_left() < within

    def close(self) -> None:
        """Nothing to remove on disk; ``client.release(key)`` gives the key back to the broker."""

    def __repr__(self) -> str:
        return (
            f"LitellmKey(credential_id={self.credential_id!r}, name={self.name!r}, "
            f"scope={self.scope!r}, expires_at={self.expires_at.isoformat()!r}, bot={self.bot!r})"
        )

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("LitellmKey holds a secret and is not pickled")


@dataclass(frozen=True)
class PendingApproval:
    """An approval request the broker opened (``202``): a human has to decide it.

    Wait for it with ``client.wait(pending)`` (or ``await``), or look once with ``client.poll``.
    """

    request_id: str
    state: str
    poll_url: str
    rule: str | None
    reason: str | None
    created_at: str | None
    expires_at: str | None
    resource: Mapping[str, Any]
    request: CredentialRequest

    @classmethod
    def from_answer(cls, answer: Mapping[str, Any], request: CredentialRequest) -> PendingApproval:
        request_id = answer.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("the approval request has no id")
        poll_url = answer.get("poll_url") or f"/v1/requests/{request_id}"
        return cls(
            request_id=request_id,
            state=str(answer.get("state", "PENDING")),
            poll_url=str(poll_url),
            rule=answer.get("rule"),
            reason=answer.get("reason"),
            created_at=answer.get("created_at"),
            expires_at=answer.get("expires_at"),
            resource=dict(answer.get("resource") or {}),
            request=request,
        )


def monotonic() -> float:
    return time.monotonic()


def as_repositories(repo: str | Sequence[str] | None, repositories: Sequence[str] | None) -> tuple[str, ...]:
    """``repo="o/r"`` (the seed's keyword) or ``repositories=[...]`` (several of one owner)."""
    names: list[str] = []
    if isinstance(repo, str):
        names.append(repo)
    elif repo is not None:
        names.extend(repo)
    if repositories is not None:
        names.extend(repositories)
    if not names:
        raise ValueError("name a repository: repo='owner/name'")
    return tuple(names)
