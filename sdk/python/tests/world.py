"""The SDK's test world: a fake GitHub (the REST calls the broker makes, with a settable token
lifetime) that is also a git smart-HTTP server (``git http-backend``) accepting exactly the live
tokens it minted, and the real ``botcreds serve`` started on an ephemeral port against it."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[3]
APP_ID = 912345
APP_SLUG = "sdk-test-app"
INSTALLATION_ID = 77


@dataclass
class GithubState:
    token_lifetime: float = 3600.0
    live: dict[str, datetime] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    mints: int = 0
    #: While set, mints answer 500 (GitHub failing).
    fail_mints: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def is_live(self, token: str) -> bool:
        with self.lock:
            exp = self.live.get(token)
            return exp is not None and exp > datetime.now(timezone.utc)


class FakeGithub:
    """GitHub's REST API as far as the broker uses it, and git hosting under ``/OWNER/REPO.git``."""

    def __init__(self, git_root: Path) -> None:
        self.state = GithubState()
        self.git_root = git_root
        handler = _make_handler(self)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _make_handler(gh: FakeGithub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _json(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_DELETE(self) -> None:
            self._route("DELETE")

        def _route(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            if ".git/" in path:
                self._git(method)
                return
            if method == "GET" and path == "/app":
                self._json(200, {"id": APP_ID, "slug": APP_SLUG})
            elif method == "GET" and path == f"/users/{APP_SLUG}%5Bbot%5D":
                self._json(200, {"id": 4242, "login": f"{APP_SLUG}[bot]"})
            elif method == "GET" and re.fullmatch(r"/repos/[^/]+/[^/]+/installation", path):
                self._json(200, {"id": INSTALLATION_ID, "suspended_at": None})
            elif method == "POST" and path == f"/app/installations/{INSTALLATION_ID}/access_tokens":
                body = json.loads(self._body() or b"{}")
                if gh.state.fail_mints:
                    self._json(500, {"message": "Server Error"})
                    return
                token = "ghs_" + secrets.token_hex(18)
                now = datetime.now(timezone.utc).replace(microsecond=0)
                with gh.state.lock:
                    expires = now + timedelta(seconds=gh.state.token_lifetime)
                    gh.state.live[token] = expires
                    gh.state.mints += 1
                self._json(
                    201,
                    {
                        "token": token,
                        "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "permissions": body.get("permissions", {}),
                    },
                )
            elif method == "DELETE" and path == "/installation/token":
                token = (self.headers.get("Authorization") or "").split(" ", 1)[-1]
                with gh.state.lock:
                    if gh.state.live.pop(token, None) is not None:
                        gh.state.revoked.add(token)
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._json(404, {"message": "Not Found"})

        def _git(self, method: str) -> None:
            auth = self.headers.get("Authorization") or ""
            ok = False
            if auth.startswith("Basic "):
                try:
                    user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                    ok = user == "x-access-token" and gh.state.is_live(password)
                except ValueError:
                    ok = False
            body = self._body()
            if not ok:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="fake-github"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path, _, query = self.path.partition("?")
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "GIT_PROJECT_ROOT": str(gh.git_root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "REQUEST_METHOD": method,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type") or "",
                "CONTENT_LENGTH": str(len(body)),
                "REMOTE_USER": "x-access-token",
                "REMOTE_ADDR": "127.0.0.1",
            }
            out = subprocess.run(
                ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
            ).stdout
            head, _, payload = out.partition(b"\r\n\r\n")
            status = 200
            headers: list[tuple[str, str]] = []
            for line in head.decode().split("\r\n"):
                name, _, value = line.partition(":")
                if name.lower() == "status":
                    status = int(value.strip().split()[0])
                elif name:
                    headers.append((name, value.strip()))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def make_repo(git_root: Path, name: str) -> None:
    """A bare repository ``git_root/name.git`` with one commit holding README."""
    bare = git_root / f"{name}.git"
    bare.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    work = Path(tempfile.mkdtemp())
    try:
        git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@example.com"]
        subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
        (work / "README").write_text("hello from the fake GitHub\n")
        subprocess.run([*git, "add", "README"], check=True)
        subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
        subprocess.run([*git, "push", "-q", str(bare), "main"], check=True)
        subprocess.run(["git", "-C", str(bare), "symbolic-ref", "HEAD", "refs/heads/main"], check=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def botcreds_binary() -> Path:
    path = Path(os.environ.get("BOTCREDS_BIN", REPO_ROOT / "target" / "debug" / "botcreds"))
    if not path.exists():
        raise RuntimeError(f"{path} is missing: cargo build -p botcreds-broker --bins")
    return path


class BrokerProcess:
    """``botcreds serve`` on 127.0.0.1:0; its stderr is kept in ``logs``."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.dev = "--dev" in args
        self.logs: list[str] = []
        self._ready = threading.Event()
        self.addr = ""
        self.tls_addr = ""
        self._tls_ready = threading.Event()
        self.banner: dict[str, str] = {}
        self.proc = subprocess.Popen(
            [str(botcreds_binary()), *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._read, args=(stream,), daemon=True).start()
        if not self._ready.wait(60) or not self.addr:
            self.stop()
            raise RuntimeError("the broker did not start:\n" + "\n".join(self.logs))
        self.url = f"http://{self.addr}"

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.logs.append(line.rstrip("\n"))
            m = re.search(r"botcreds broker listening.*addr=(\S+)", line)
            if m and not self.dev:
                self.addr = m.group(1)
                self._ready.set()
            m = re.search(r"botcreds mTLS listening.*addr=(\S+)", line)
            if m:
                self.tls_addr = m.group(1)
                self._tls_ready.set()
            m = re.match(r"\s+(API key|Admin key|Listening on):\s+(\S+)", line)
            if m:
                self.banner[m.group(1)] = m.group(2)
                if m.group(1) == "Listening on":
                    self.addr = m.group(2).removeprefix("http://")
                if {"API key", "Admin key", "Listening on"} <= self.banner.keys():
                    self._ready.set()
        self._ready.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


POLICY = """
bots:
  sdk-bot:
    identity: { type: api_key }
    auto_approve:
      - repo: "sdk-org/app"
        permissions: [contents:write, contents:read, issues:write]
      - repo: "sdk-org/session-*"
        permissions: [contents:read]
    requires_approval:
      - repo: "sdk-org/sensitive-*"
    deny:
      - repo: "sdk-org/infrastructure"
  sdk-cert-bot:
    identity: { type: mtls }
    auto_approve:
      - repo: "sdk-org/app"
        permissions: [contents:read]
  sdk-hasty-bot:
    identity: { type: api_key }
    approval_timeout: 2s
    requires_approval:
      - repo: "sdk-org/*"
defaults:
  requires_approval: false
  approval_timeout: 24h
"""


@dataclass
class World:
    github: FakeGithub
    broker: BrokerProcess
    bot_key: str
    hasty_key: str
    admin_key: str
    dir: Path

    def enroll(self, bot: str, state_dir: Path) -> None:
        """Enroll like a host does: a join token from the admin CLI, then
        ``botcreds-agent enroll`` writes ``client.pem`` and ``ca.pem`` to ``state_dir``."""
        created = self.cli("enroll", "create", "--bot", bot, "--ttl", "10m", "--json")
        assert created.returncode == 0, created.stderr
        token = json.loads(created.stdout)["token"]
        agent = botcreds_binary().with_name("botcreds-agent")
        done = subprocess.run(
            [
                str(agent),
                "enroll",
                "--broker",
                self.broker.url,
                "--token",
                token,
                "--state-dir",
                str(state_dir),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "BOTCREDS_BROKER": self.broker.url,
            "BOTCREDS_API_KEY": self.admin_key,
        }
        return subprocess.run(
            [str(botcreds_binary()), *args], env=env, capture_output=True, text=True, check=False
        )


def start_world(tmp: Path) -> World:
    git_root = tmp / "git"
    make_repo(git_root, "sdk-org/app")
    github = FakeGithub(git_root)
    key = tmp / "app-key.pem"
    shutil.copy(REPO_ROOT / "tests" / "fixtures" / "github" / "test-app-key.pem", key)
    key.chmod(0o600)
    (tmp / "policy.yaml").write_text(POLICY)
    keys = {name: "bck_" + secrets.token_hex(16) for name in ("sdk-bot", "sdk-hasty-bot", "sdk-admin")}
    toml = [
        'listen = ["127.0.0.1:0"]',
        'data_dir = "data"',
        'policy = "policy.yaml"',
        "[tailscale]",
        "enabled = false",
        "[github]",
        f"app_id = {APP_ID}",
        'private_key_file = "app-key.pem"',
        f'api_url = "{github.url}"',
        "[admin]",
        'api_key_bots = ["sdk-admin"]',
        "[tls]",
        'listen = ["127.0.0.1:0"]',
        'server_names = ["localhost", "127.0.0.1"]',
    ]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RUST_LOG": "info"}
    for i, (bot, value) in enumerate(keys.items()):
        toml += ["[[api_keys]]", f'bot = "{bot}"', f'key_env = "SDK_TEST_KEY_{i}"']
        env[f"SDK_TEST_KEY_{i}"] = value
    (tmp / "broker.toml").write_text("\n".join(toml) + "\n")
    broker = BrokerProcess(["serve", "--config", str(tmp / "broker.toml")], env, tmp)
    if not broker._tls_ready.wait(30):
        broker.stop()
        raise RuntimeError("the broker's mTLS listener did not start:\n" + "\n".join(broker.logs))
    return World(github, broker, keys["sdk-bot"], keys["sdk-hasty-bot"], keys["sdk-admin"], tmp)
