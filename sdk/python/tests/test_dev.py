"""The seed's snippets, unchanged but for the URL and key, against ``botcreds serve --dev``
(simulated GitHub and LiteLLM), and LiteLLM keys through the same waiting and errors."""

from __future__ import annotations

import os
import subprocess

import pytest
from world import BrokerProcess, botcreds_binary

from botcreds import BrokerClient, LitellmKey, PendingApproval, PolicyDenied


def test_the_seeds_snippets(dev_broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_API_KEY", dev_broker.banner["API key"])
    monkeypatch.setenv("GIT_ASKPASS", "")

    client = BrokerClient(broker_url=dev_broker.url, bot_id="demo-bot", api_key=os.environ["BROKER_API_KEY"])

    # Request credentials
    creds = client.get_credentials(
        repo="demo-org/app",
        permissions=["contents:write", "issues:write"],
        reason="Fixing bug #123",
        wait_for_approval=True,  # Block until approved (with timeout)
        ttl="1h",
    )

    # Use for git
    os.environ["GIT_ASKPASS"] = creds.git_askpass_helper
    # (the simulated GitHub's tokens are not valid on github.com: no clone here; the test
    # world's git server takes the clone in test_broker.py)
    assert creds.repo_url == "https://github.com/demo-org/app.git"
    assert os.access(os.environ["GIT_ASKPASS"], os.X_OK)
    answer = subprocess.run(
        [os.environ["GIT_ASKPASS"], "Password for 'https://github.com': "],
        capture_output=True,
        text=True,
        check=True,
    )
    assert answer.stdout == creds.token + "\n"
    assert creds.token.startswith("ghs_")
    assert creds.attribution.trailer == "Bot: demo-bot"

    # Option 1: Auto-refresh wrapper
    with client.session(repo="demo-org/app", permissions=["contents:write"]) as session:
        # Token auto-refreshes before expiry
        assert session.token.startswith("ghs_")

    # Option 2: Manual refresh
    creds = client.get_credentials(repo="demo-org/app", permissions=["contents:write"])
    if creds.expires_soon():
        creds = client.refresh(creds)
    assert not creds.expires_soon()
    creds.close()


def test_litellm_keys(dev_broker: BrokerProcess) -> None:
    client = BrokerClient(dev_broker.url, "demo-bot", dev_broker.banner["API key"])
    key = client.get_litellm_key(scope="agent:review", reason="review bot")
    assert isinstance(key, LitellmKey)
    assert key.key.startswith("sk-")
    assert key.scope == "agent:review" and key.bot == "demo-bot"
    assert key.key not in repr(key)
    assert client.refresh(key).credential_id == key.credential_id
    released = client.release(key)
    assert released["released"] is True
    # A scope the demo policy does not auto-approve goes to a human, like a GitHub token.
    pending = client.get_litellm_key(scope="agent:write", wait_for_approval=False)
    assert isinstance(pending, PendingApproval)
    env = {
        "PATH": os.environ["PATH"],
        "BOTCREDS_BROKER": dev_broker.url,
        "BOTCREDS_API_KEY": dev_broker.banner["Admin key"],
    }
    subprocess.run(
        [str(botcreds_binary()), "approve", pending.request_id], env=env, check=True, capture_output=True
    )
    approved = client.wait(pending, timeout=30)
    assert isinstance(approved, LitellmKey) and approved.scope == "agent:write"


def test_a_denied_repository_in_dev_mode(dev_broker: BrokerProcess) -> None:
    client = BrokerClient(dev_broker.url, "demo-bot", dev_broker.banner["API key"])
    with pytest.raises(PolicyDenied) as err:
        client.get_credentials(repo="demo-org/infrastructure", permissions=["contents:read"])
    assert err.value.rule == "bots.demo-bot.deny[0]"
