"""The SDK against the real broker: policy outcomes, waiting for approvals decided from the CLI,
sessions over short-lived tokens, the askpass helper with git, and no token in any output."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from world import World

import botcreds
from botcreds import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalTimeout,
    AsyncBrokerClient,
    BrokerClient,
    BrokerError,
    BrokerUnavailable,
    Credentials,
    PendingApproval,
    PolicyDenied,
)


@pytest.fixture
def client(world: World) -> Iterator[BrokerClient]:
    with BrokerClient(broker_url=world.broker.url, bot_id="sdk-bot", api_key=world.bot_key) as c:
        yield c


class PendingSeen(logging.Handler):
    """Sets ``event`` when the SDK logs that an approval request is pending — the moment a
    waiting ``get_credentials`` starts its long-poll."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.event = threading.Event()
        self.request_id = ""

    def emit(self, record: logging.LogRecord) -> None:
        if "is pending" in record.getMessage():
            self.request_id = str(record.args[0]) if isinstance(record.args, tuple) else ""
            self.event.set()


@pytest.fixture
def pending_seen() -> Iterator[PendingSeen]:
    handler = PendingSeen()
    logger = logging.getLogger("botcreds")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def decide_in_background(world: World, seen: PendingSeen, *args: str) -> threading.Thread:
    """Once the request is pending, run ``botcreds ARGS... <request id>`` from another thread."""
    results: list[subprocess.CompletedProcess[str]] = []

    def run() -> None:
        assert seen.event.wait(30), "the SDK never reported a pending request"
        results.append(world.cli(*args[:1], seen.request_id, *args[1:]))

    t = threading.Thread(target=run)
    t.results = results  # type: ignore[attr-defined]
    t.start()
    return t


def test_an_auto_approved_token(client: BrokerClient, world: World) -> None:
    creds = client.get_credentials(
        repo="sdk-org/app",
        permissions=["contents:write", "issues:write"],
        reason="Fixing bug #123",
        wait_for_approval=True,
        ttl="1h",
    )
    assert isinstance(creds, Credentials)
    assert creds.token.startswith("ghs_")
    assert world.github.state.is_live(creds.token)
    assert creds.approval == "auto"
    assert creds.bot == "sdk-bot"
    assert creds.repositories == ("sdk-org/app",)
    assert creds.permissions == {"contents": "write", "issues": "write"}
    assert creds.credential_id.startswith("tok_")
    assert creds.repo_url == f"https://127.0.0.1:{world.github.port}/sdk-org/app.git"
    assert creds.token not in creds.repo_url
    assert creds.attribution.name == "sdk-test-app[bot]"
    assert creds.attribution.email == "4242+sdk-test-app[bot]@users.noreply.github.com"
    assert creds.attribution.trailer == "Bot: sdk-bot"
    assert not creds.expires_soon()
    assert creds.expires_soon(within=2 * 3600)
    # Asked again, the broker reuses the live token; refresh() asks again the same way.
    again = client.refresh(creds)
    assert again.credential_id == creds.credential_id


def test_denied_by_a_rule(client: BrokerClient) -> None:
    with pytest.raises(PolicyDenied) as err:
        client.get_credentials(repo="sdk-org/infrastructure", permissions=["contents:read"])
    assert err.value.code == "policy_denied"
    assert err.value.rule == "bots.sdk-bot.deny[0]"
    assert err.value.status == 403
    assert "bots.sdk-bot.deny[0]" in str(err.value)


def test_bad_requests_carry_the_brokers_code(client: BrokerClient) -> None:
    with pytest.raises(BrokerError) as err:
        client.get_credentials(repo="sdk-org/app", permissions=["contents:admin"])
    assert err.value.code == "unknown_permission"
    with pytest.raises(BrokerError) as err:
        BrokerClient(broker_url=client.broker_url, api_key="bck_not_a_key").get_credentials(
            repo="sdk-org/app", permissions=["contents:read"]
        )
    assert err.value.code == "invalid_api_key"


def test_an_unreachable_broker(tmp_path: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(BrokerUnavailable) as err:
        BrokerClient(broker_url=f"127.0.0.1:{port}", api_key="bck_x").get_credentials(
            repo="sdk-org/app", permissions=["contents:read"]
        )
    assert err.value.code == "unreachable"


def test_approved_from_the_cli_while_get_credentials_blocks(
    client: BrokerClient, world: World, pending_seen: PendingSeen
) -> None:
    approver = decide_in_background(world, pending_seen, "approve")
    creds = client.get_credentials(
        repo="sdk-org/sensitive-data",
        permissions=["contents:write"],
        reason="release 1.2",
        wait_for_approval=True,
        timeout=60,
    )
    approver.join()
    result = approver.results[0]  # type: ignore[attr-defined]
    assert result.returncode == 0, result.stderr
    assert isinstance(creds, Credentials)
    assert creds.approval == "manual"
    assert creds.request_id == pending_seen.request_id
    assert world.github.state.is_live(creds.token)


def test_denied_from_the_cli_raises(client: BrokerClient, world: World, pending_seen: PendingSeen) -> None:
    denier = decide_in_background(world, pending_seen, "deny", "--reason", "not today")
    with pytest.raises(ApprovalDenied) as err:
        client.get_credentials(repo="sdk-org/sensitive-denied", permissions=["contents:write"], timeout=60)
    denier.join()
    assert denier.results[0].returncode == 0  # type: ignore[attr-defined]
    assert err.value.code == "approval_denied"
    assert err.value.request_id == pending_seen.request_id
    assert "not today" in err.value.message


def test_an_expired_approval_raises(world: World) -> None:
    hasty = BrokerClient(broker_url=world.broker.url, bot_id="sdk-hasty-bot", api_key=world.hasty_key)
    with pytest.raises(ApprovalExpired) as err:
        hasty.get_credentials(repo="sdk-org/app", permissions=["contents:read"], timeout=60)
    assert err.value.code == "approval_expired"
    assert err.value.request_id is not None and err.value.request_id.startswith("apr_")


def test_without_waiting_a_pending_request_and_a_timeout(client: BrokerClient, world: World) -> None:
    pending = client.get_credentials(
        repo="sdk-org/sensitive-later", permissions=["contents:read"], wait_for_approval=False
    )
    assert isinstance(pending, PendingApproval)
    assert pending.request_id.startswith("apr_")
    assert pending.rule == "bots.sdk-bot.requires_approval[0]"
    assert isinstance(client.poll(pending), PendingApproval)
    with pytest.raises(ApprovalTimeout) as err:
        client.wait(pending, timeout=1)
    assert err.value.pending.request_id == pending.request_id
    assert world.cli("approve", pending.request_id).returncode == 0
    creds = client.wait(err.value.pending)
    assert isinstance(creds, Credentials) and world.github.state.is_live(creds.token)


def test_the_askpass_helper_clones_and_goes_away(client: BrokerClient, world: World, tmp_path: Path) -> None:
    creds = client.get_credentials(repo="sdk-org/app", permissions=["contents:read"])
    assert isinstance(creds, Credentials)
    helper = Path(creds.git_askpass_helper)
    assert stat.S_IMODE(helper.stat().st_mode) == 0o700
    assert stat.S_IMODE(helper.parent.stat().st_mode) == 0o700
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": creds.git_askpass_helper,
    }
    # The fake GitHub serves git over plain http on the host:port of the clone URL.
    url = creds.repo_url.replace("https://", "http://", 1)
    dest = tmp_path / "app"
    done = subprocess.run(["git", "clone", "-q", url, str(dest)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (dest / "README").read_text() == "hello from the fake GitHub\n"
    # The server checks the token: without the helper the clone is refused.
    env.pop("GIT_ASKPASS")
    refused = subprocess.run(
        ["git", "clone", "-q", url, str(tmp_path / "nope")], env=env, capture_output=True, text=True
    )
    assert refused.returncode != 0
    creds.close()
    assert not helper.exists() and not helper.parent.exists()


def test_the_askpass_helper_is_removed_at_exit(tmp_path: Path) -> None:
    code = (
        "import botcreds\n"
        "from botcreds import CredentialRequest, Credentials\n"
        "c = Credentials({'token': 'ghs_exit', 'credential_id': 'tok_x', "
        "'expires_at': '2099-01-01T00:00:00Z'}, CredentialRequest(kind='github_token'))\n"
        "print(c.git_askpass_helper)\n"
        "keep = c\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip())
    assert path.name == "askpass"
    assert not path.exists() and not path.parent.exists()


def test_a_session_refreshes_short_lived_tokens_unnoticed(client: BrokerClient, world: World) -> None:
    world.github.state.token_lifetime = 24
    try:
        seen: set[str] = set()
        with client.session(repo="sdk-org/session-a", permissions=["contents:read"]) as session:
            first = session.credentials.credential_id
            # A caller using the token all along: every token it is handed is live at GitHub.
            deadline = time.monotonic() + 90
            while session.refreshes < 2 and time.monotonic() < deadline:
                token = session.token
                assert world.github.state.is_live(token)
                seen.add(token)
                time.sleep(0.2)
            assert session.refreshes >= 2
            seen.add(session.token)
            assert world.github.state.is_live(session.token)
            assert session.credentials.credential_id != first
            thread_names = {t.name for t in threading.enumerate()}
            assert "botcreds-session" in thread_names
        assert len(seen) >= 3
        assert "botcreds-session" not in {t.name for t in threading.enumerate()}
        with pytest.raises(botcreds.SessionClosed):
            _ = session.token
    finally:
        world.github.state.token_lifetime = 3600


def test_a_session_surfaces_refresh_errors_on_access(client: BrokerClient, world: World) -> None:
    world.github.state.token_lifetime = 24
    try:
        with client.session(repo="sdk-org/session-c", permissions=["contents:read"]) as session:
            world.github.state.fail_mints = True
            # While the token lives the caller keeps getting it; once it is about to expire and
            # refreshing keeps failing, access raises the refresh error instead of a dead token.
            deadline = time.monotonic() + 60
            with pytest.raises(BrokerUnavailable) as err:
                while time.monotonic() < deadline:
                    assert world.github.state.is_live(session.token)
                    time.sleep(0.2)
            assert err.value.status == 502
            assert session.refreshes == 0
    finally:
        world.github.state.fail_mints = False
        world.github.state.token_lifetime = 3600


def test_refresh_with_a_rejected_token_replaces_it(client: BrokerClient, world: World) -> None:
    creds = client.get_credentials(repo="sdk-org/app", permissions=["issues:write"])
    assert isinstance(creds, Credentials)
    assert client.refresh(creds).credential_id == creds.credential_id
    fresh = client.refresh(creds, rejected=True)
    assert fresh.credential_id != creds.credential_id
    assert world.github.state.is_live(fresh.token)
    assert not world.github.state.is_live(creds.token)


def test_the_token_never_shows(client: BrokerClient, world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    creds = client.get_credentials(repo="sdk-org/app", permissions=["contents:read"], reason="log")
    assert isinstance(creds, Credentials)
    token = creds.token
    texts = [repr(creds), str(creds), repr(client), f"{creds}", repr(creds.attribution)]
    with client.session(repo="sdk-org/app", permissions=["contents:read"]) as session:
        texts.append(repr(session))
    # An exception raised around a credential: the identity check refuses a foreign bot's token.
    other = BrokerClient(broker_url=world.broker.url, bot_id="someone-else", api_key=world.bot_key)
    with pytest.raises(BrokerError) as err:
        other.get_credentials(repo="sdk-org/app", permissions=["contents:read"])
    assert err.value.code == "identity_mismatch"
    texts += [str(err.value), repr(err.value), repr(err.value.args)]
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(creds)
    for text in texts:
        assert token not in text
    assert token not in caplog.text
    assert "Bearer" not in caplog.text and world.bot_key not in caplog.text


def test_the_async_twin(world: World) -> None:
    async def main() -> None:
        async with AsyncBrokerClient(world.broker.url, "sdk-bot", world.bot_key) as c:
            creds = await c.get_credentials(repo="sdk-org/app", permissions=["contents:read"])
            assert isinstance(creds, Credentials) and world.github.state.is_live(creds.token)
            with pytest.raises(PolicyDenied) as err:
                await c.get_credentials(repo="sdk-org/infrastructure", permissions=["contents:read"])
            assert err.value.rule == "bots.sdk-bot.deny[0]"
            pending = await c.get_credentials(
                repo="sdk-org/sensitive-async", permissions=["contents:read"], wait_for_approval=False
            )
            assert isinstance(pending, PendingApproval)
            waiter = asyncio.create_task(c.wait(pending, timeout=60))
            approve = await asyncio.to_thread(world.cli, "approve", pending.request_id)
            assert approve.returncode == 0, approve.stderr
            got = await waiter
            assert isinstance(got, Credentials) and got.approval == "manual"
            world.github.state.token_lifetime = 24
            try:
                async with c.session(repo="sdk-org/session-b", permissions=["contents:read"]) as s:
                    first = s.credentials.credential_id
                    deadline = time.monotonic() + 60
                    while s.refreshes < 1 and time.monotonic() < deadline:
                        assert world.github.state.is_live(s.token)
                        await asyncio.sleep(0.2)
                    assert s.credentials.credential_id != first
            finally:
                world.github.state.token_lifetime = 3600

    asyncio.run(main())


def test_mtls_with_the_agents_enrolled_certificate(world: World, tmp_path: Path) -> None:
    state = tmp_path / "state"
    world.enroll("sdk-cert-bot", state)
    with BrokerClient(f"https://{world.broker.tls_addr}", "sdk-cert-bot", mtls_dir=state) as c:
        assert c.whoami()["via"] == "mtls"
        creds = c.get_credentials(repo="sdk-org/app", permissions=["contents:read"])
        assert creds.bot == "sdk-cert-bot" and world.github.state.is_live(creds.token)
    # Without the certificate the listener lets nobody in.
    anon = BrokerClient(f"https://{world.broker.tls_addr}", ca_bundle=state / "ca.pem")
    with pytest.raises(BrokerUnavailable):
        anon.get_credentials(repo="sdk-org/app", permissions=["contents:read"])
    anon.close()
