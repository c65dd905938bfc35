"""Fixtures: one test world (fake GitHub + git hosting + the real broker) per test session, and a
dev-mode broker (``botcreds serve --dev``) for the seed's snippets and LiteLLM keys."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from world import BrokerProcess, World, start_world


@pytest.fixture(scope="session")
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="botcreds-sdk-test-") as tmp:
        w = start_world(Path(tmp))
        try:
            yield w
        finally:
            w.broker.stop()
            w.github.stop()


@pytest.fixture(scope="session")
def dev_broker() -> Iterator[BrokerProcess]:
    with tempfile.TemporaryDirectory(prefix="botcreds-sdk-dev-") as tmp:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUST_LOG": "info"}
        broker = BrokerProcess(["serve", "--dev", "--listen", "127.0.0.1:0"], env, Path(tmp))
        try:
            yield broker
        finally:
            broker.stop()
