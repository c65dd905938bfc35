#!/usr/bin/env python3
"""The REAL LiteLLM proxy (virtual keys on PostgreSQL) for botcreds' LiteLLM suites.

    python3 tests/litellm-real/litellm_real.py start    # install what is missing, start, print env
    python3 tests/litellm-real/litellm_real.py stop     # stop what `start` started
    python3 tests/litellm-real/litellm_real.py status   # print env and exit 0 when ready, else 1

`start` prints shell assignments for the suites (`eval "$(... start)"`):

    export BOTCREDS_REAL_LITELLM_URL=http://127.0.0.1:PORT
    export BOTCREDS_REAL_LITELLM_MASTER_KEY=sk-...

Only package registries are needed: Debian (postgresql, nodejs, npm, python3-venv; installed
with apt-get when missing and running as root), PyPI (litellm[proxy], prisma) and npm (Prisma's
query engine compiled to WebAssembly and its node-postgres adapter). Prisma's native engine
binaries come from binaries.prisma.sh, which such a machine cannot reach, so prisma-client-py
is pointed at `query-engine.mjs` (next to this file): the same engine core behind the native
engine's HTTP API. LiteLLM, its key management and auth code, Prisma's SQL and PostgreSQL are the
real thing.

Environment (all optional):
    BOTCREDS_LITELLM_VERSION   litellm version to test (default 1.106.2, the pinned one)
    BOTCREDS_TEST_CACHE        cache of venvs, npm packages and the database cluster
                               (default ~/.cache/botcreds-tests)
    BOTCREDS_TEST_PGDIR        the PostgreSQL cluster (default: in the cache; as root
                               /var/tmp/botcreds-tests/litellm-<version>-pg, which the
                               postgres user can enter)
    BOTCREDS_REAL_LITELLM_MASTER_KEY   the proxy's master key (default a fixed test key)

Every `start` gives LiteLLM a fresh database (a copy of a migrated template), so keys of an
earlier run never collide with a new one's. The cluster, the venv and node_modules stay cached,
so only the first start installs anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PINNED_LITELLM = "1.106.2"
# What LiteLLM's requirements pin; its generated client must match the schema it ships.
PRISMA_PY = "0.11.0"
DEFAULT_MASTER_KEY = "sk-botcreds-real-litellm-master-0001"
HERE = Path(__file__).resolve().parent
READY_TIMEOUT_S = 240


def log(msg: str) -> None:
    print(f"litellm-real: {msg}", file=sys.stderr, flush=True)


class Failed(Exception):
    pass


def run(cmd: list[str], *, env: dict | None = None, cwd: Path | None = None, quiet_log: Path | None = None) -> None:
    """Run a command; on failure show its output (or the tail of its log) and stop."""
    if quiet_log is not None:
        with open(quiet_log, "wb") as out:
            rc = subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            tail = quiet_log.read_text(errors="replace").splitlines()[-30:]
            raise Failed(f"{cmd[0]} failed ({rc}):\n" + "\n".join(tail))
        return
    rc = subprocess.run(cmd, env=env, cwd=cwd, stdout=sys.stderr, stderr=sys.stderr).returncode
    if rc != 0:
        raise Failed(f"{' '.join(cmd[:3])} ... failed ({rc})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Paths:
    def __init__(self) -> None:
        self.version = os.environ.get("BOTCREDS_LITELLM_VERSION", PINNED_LITELLM)
        cache = Path(os.environ.get("BOTCREDS_TEST_CACHE", Path.home() / ".cache" / "botcreds-tests"))
        self.cache = cache
        self.root = cache / f"litellm-{self.version}"
        self.venv = self.root / "venv"
        qe_id = hashlib.sha256((HERE / "package.json").read_bytes()).hexdigest()[:12]
        self.qe = cache / f"query-engine-{qe_id}"
        self.shim = self.qe / "query-engine.mjs"
        # As root the cluster belongs to `postgres`, who cannot enter a home directory
        # (mode 700): it lives under /var/tmp then.
        pg_parent = Path("/var/tmp/botcreds-tests") if os.geteuid() == 0 else cache
        self.pg = Path(os.environ.get("BOTCREDS_TEST_PGDIR", pg_parent / f"litellm-{self.version}-pg"))
        self.pgdata = self.pg / "data"
        self.run = self.root / "run"
        self.logs = self.run / "logs"
        self.state = self.run / "state.json"
        self.home = self.root / "home"
        self.schema = self.root / "schema.prisma"
        self.lock = self.root / ".lock"


# ----------------------------------------------------------------------------- installation

def pg_bindir() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for d in candidates:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def ensure_system() -> None:
    missing = []
    if shutil.which("node") is None:
        missing.append("nodejs")
    if shutil.which("npm") is None:
        missing.append("npm")
    if shutil.which("psql") is None:
        missing.append("postgresql-client")
    if pg_bindir() is None or (os.geteuid() == 0 and not user_exists("postgres")):
        missing.append("postgresql")
    if subprocess.run([sys.executable, "-c", "import venv, ensurepip"], capture_output=True).returncode != 0:
        missing.append("python3-venv")
    if not missing:
        return
    if os.geteuid() != 0:
        raise Failed(f"missing {' '.join(missing)}: install them (or run this as root)")
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", *missing], env=env)


def user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def ensure_venv(p: Paths) -> None:
    spec = "litellm[proxy]" if p.version == "latest" else f"litellm[proxy]=={p.version}"
    want = f"{spec} prisma=={PRISMA_PY}"
    stamp = p.venv / ".botcreds-stamp"
    if stamp.exists() and stamp.read_text() == want:
        return
    t = time.monotonic()
    shutil.rmtree(p.venv, ignore_errors=True)
    p.root.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "venv", str(p.venv)])
    run([str(p.venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", spec, f"prisma=={PRISMA_PY}"])
    stamp.write_text(want)
    (p.root / ".client-stamp").unlink(missing_ok=True)
    log(f"venv with {want} ready in {time.monotonic() - t:.0f}s")


def ensure_query_engine(p: Paths) -> None:
    p.qe.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "package.json", p.qe / "package.json")
    shutil.copyfile(HERE / "query-engine.mjs", p.shim)
    p.shim.chmod(0o755)
    want = hashlib.sha256((HERE / "package.json").read_bytes()).hexdigest()
    stamp = p.qe / ".npm-stamp"
    if stamp.exists() and stamp.read_text() == want and (p.qe / "node_modules").is_dir():
        return
    t = time.monotonic()
    run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=p.qe)
    stamp.write_text(want)
    log(f"query engine packages installed in {time.monotonic() - t:.0f}s")


def venv_python(p: Paths, code: str) -> str:
    out = subprocess.run([str(p.venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True"))
    if out.returncode != 0:
        raise Failed(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "python failed")
    return out.stdout.strip()


def package_dir(p: Paths, package: str) -> Path:
    return Path(venv_python(p, f"import importlib.util as u; print(u.find_spec({package!r}).submodule_search_locations[0])"))


def prisma_env(p: Paths) -> dict:
    # Engine paths are given, so the Prisma CLI downloads no engine; HOME keeps its npm-installed
    # CLI inside the cache.
    return dict(
        os.environ,
        HOME=str(p.home),
        PRISMA_HOME_DIR=str(p.home),
        PATH=f"{p.venv / 'bin'}:{os.environ.get('PATH', '')}",
        PRISMA_QUERY_ENGINE_BINARY=str(p.shim),
        PRISMA_SCHEMA_ENGINE_BINARY=str(p.shim),
        PRISMA_CLI_QUERY_ENGINE_TYPE="binary",
        PRISMA_ENGINES_CHECKSUM_IGNORE_MISSING="1",
        PRISMA_HIDE_UPDATE_MESSAGE="1",
        CHECKPOINT_DISABLE="1",
    )


def ensure_client(p: Paths) -> None:
    """`prisma generate` for LiteLLM's schema, offline, only for the "native" target."""
    src = package_dir(p, "litellm") / "proxy" / "schema.prisma"
    lines = []
    for line in src.read_text().splitlines():
        if line.strip().startswith("binaryTargets"):
            line = line[: line.index("binaryTargets")] + 'binaryTargets = ["native"]'
        lines.append(line)
    text = "\n".join(lines) + "\n"
    want = hashlib.sha256(text.encode()).hexdigest()
    stamp = p.root / ".client-stamp"
    if stamp.exists() and stamp.read_text() == want and p.schema.exists():
        return
    p.schema.write_text(text)
    p.home.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    run([str(p.venv / "bin" / "prisma"), "generate", "--schema", str(p.schema)], env=prisma_env(p),
        quiet_log=p.logs / "prisma-generate.log")
    stamp.write_text(want)
    log(f"prisma client generated in {time.monotonic() - t:.0f}s")


# -------------------------------------------------------------------------------- postgres

def as_postgres(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def psql(port: int, db: str, *args: str, capture: bool = False) -> str:
    cmd = ["psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", *args]
    env = dict(os.environ, PGOPTIONS="-c client_min_messages=warning")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise Failed(f"psql failed: {out.stderr.strip()[-2000:]}")
    return out.stdout.strip() if capture else ""


def start_postgres(p: Paths, port: int) -> None:
    bindir = pg_bindir()
    if bindir is None:
        raise Failed("PostgreSQL server binaries not found")
    p.pg.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(p.pg, "postgres", "postgres")
        p.pg.chmod(0o700)
    if not (p.pgdata / "PG_VERSION").exists():
        t = time.monotonic()
        run(as_postgres([str(bindir / "initdb"), "-D", str(p.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
            quiet_log=p.logs / "initdb.log")
        log(f"database cluster created in {time.monotonic() - t:.1f}s")
    t = time.monotonic()
    run(as_postgres([str(bindir / "pg_ctl"), "-D", str(p.pgdata), "-l", str(p.pg / "server.log"), "-w", "-t", "60",
                     "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {p.pg}", "start"]),
        quiet_log=p.logs / "pg_ctl.log")
    log(f"postgres on 127.0.0.1:{port} in {time.monotonic() - t:.1f}s")


def stop_postgres(p: Paths) -> None:
    bindir = pg_bindir()
    if bindir and (p.pgdata / "postmaster.pid").exists():
        subprocess.run(as_postgres([str(bindir / "pg_ctl"), "-D", str(p.pgdata), "-m", "fast", "-w", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log("postgres stopped")


TEMPLATE_DB = "litellm_template"


def migrate_template(p: Paths, port: int) -> None:
    """Apply LiteLLM's migrations (what `prisma migrate deploy` does) to the template database,
    each once, recorded in `_prisma_migrations`."""
    if not psql(port, "postgres", "-Atc", f"select 1 from pg_database where datname = '{TEMPLATE_DB}'", capture=True):
        psql(port, "postgres", "-c", f"create database {TEMPLATE_DB}")
    psql(port, TEMPLATE_DB, "-c", """create table if not exists "_prisma_migrations" (
        "id" varchar(36) primary key not null, "checksum" varchar(64) not null, "finished_at" timestamptz,
        "migration_name" varchar(255) not null, "logs" text, "rolled_back_at" timestamptz,
        "started_at" timestamptz not null default now(), "applied_steps_count" integer not null default 0)""")
    done = set(psql(port, TEMPLATE_DB, "-Atc", "select migration_name from _prisma_migrations where finished_at is not null",
                    capture=True).splitlines())
    migrations = sorted((package_dir(p, "litellm_proxy_extras") / "migrations").glob("*/migration.sql"))
    todo = [m for m in migrations if m.parent.name not in done]
    if not todo:
        return
    t = time.monotonic()
    script = p.run / "migrate.sql"
    with open(script, "w") as out:
        for m in todo:
            sql = m.read_text()
            name = m.parent.name.replace("'", "''")
            record = (f"insert into _prisma_migrations (id, checksum, finished_at, migration_name, applied_steps_count) "
                      f"values (gen_random_uuid()::text, '{hashlib.sha256(sql.encode()).hexdigest()}', now(), '{name}', 1);\n")
            path = str(m).replace("'", "''")
            # CREATE INDEX CONCURRENTLY cannot run inside a transaction.
            if "concurrently" in sql.lower():
                out.write(f"\\i '{path}'\n{record}")
            else:
                out.write(f"begin;\n\\i '{path}'\n{record}commit;\n")
    psql(port, TEMPLATE_DB, "-f", str(script))
    log(f"{len(todo)} LiteLLM migrations applied in {time.monotonic() - t:.1f}s")


def fresh_database(port: int, name: str) -> None:
    psql(port, "postgres", "-c", f"drop database if exists {name} with (force)")
    psql(port, "postgres", "-c", f"create database {name} template {TEMPLATE_DB}")


# --------------------------------------------------------------------------------- litellm

CONFIG = """\
# Written by tests/litellm-real/litellm_real.py. The models are the names botcreds' scopes use;
# their upstream is a closed port: the suites manage keys and never need an answer.
model_list:
  - model_name: claude-sonnet-4-5
    litellm_params: {model: openai/claude-sonnet-4-5, api_base: "http://127.0.0.1:9/v1", api_key: sk-unused-upstream}
  - model_name: claude-haiku-3-5
    litellm_params: {model: openai/claude-haiku-3-5, api_base: "http://127.0.0.1:9/v1", api_key: sk-unused-upstream}
general_settings: {}
"""


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health/readiness", timeout=3) as r:
            return json.load(r).get("db") == "connected"
    except Exception:
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def read_state(p: Paths) -> dict | None:
    try:
        return json.loads(p.state.read_text())
    except (OSError, ValueError):
        return None


def print_env(state: dict) -> None:
    print(f"export BOTCREDS_REAL_LITELLM_URL={state['url']}")
    print(f"export BOTCREDS_REAL_LITELLM_MASTER_KEY={state['master_key']}")
    print(f"export BOTCREDS_REAL_LITELLM_VERSION={state['version']}")


def start(p: Paths) -> int:
    t0 = time.monotonic()
    p.logs.mkdir(parents=True, exist_ok=True)
    state = read_state(p)
    if state and alive(state.get("litellm_pid", 0)) and ready(state["url"]):
        log(f"already running at {state['url']}")
        print_env(state)
        return 0
    if state:
        stop(p)
    ensure_system()
    ensure_venv(p)
    ensure_query_engine(p)
    ensure_client(p)
    pg_port = free_port()
    start_postgres(p, pg_port)
    state = {"version": p.version, "pg_port": pg_port, "master_key": os.environ.get("BOTCREDS_REAL_LITELLM_MASTER_KEY", DEFAULT_MASTER_KEY)}
    p.state.write_text(json.dumps(state))
    try:
        migrate_template(p, pg_port)
        fresh_database(pg_port, "litellm")
        config = p.run / "litellm.yaml"
        config.write_text(CONFIG)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(
            prisma_env(p),
            DATABASE_URL=f"postgresql://postgres@127.0.0.1:{pg_port}/litellm",
            LITELLM_MASTER_KEY=state["master_key"],
            # The schema is migrated above; LiteLLM's own check needs the schema engine binary.
            DISABLE_SCHEMA_UPDATE="true",
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            LITELLM_TELEMETRY="False",
        )
        t = time.monotonic()
        with open(p.logs / "litellm.log", "wb") as out:
            # Its own session: `stop` ends LiteLLM and the query engine it spawned together.
            proc = subprocess.Popen([str(p.venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        state.update(litellm_pid=proc.pid, url=url, port=port)
        p.state.write_text(json.dumps(state))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready(url):
            if proc.poll() is not None:
                raise Failed(f"litellm exited ({proc.returncode}); see {p.logs / 'litellm.log'}:\n" + tail(p.logs / "litellm.log"))
            if time.monotonic() > deadline:
                raise Failed(f"litellm not ready after {READY_TIMEOUT_S}s:\n" + tail(p.logs / "litellm.log"))
            time.sleep(0.5)
        log(f"litellm {p.version} ready at {url} in {time.monotonic() - t:.1f}s (whole start {time.monotonic() - t0:.1f}s)")
    except BaseException:
        stop(p)
        raise
    print_env(state)
    return 0


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def stop(p: Paths) -> int:
    state = read_state(p) or {}
    pid = state.get("litellm_pid")
    if pid and alive(pid):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
        log(f"litellm stopped (process group {pid})")
    stop_postgres(p)
    p.state.unlink(missing_ok=True)
    return 0


def status(p: Paths) -> int:
    state = read_state(p)
    if state and alive(state.get("litellm_pid", 0)) and ready(state["url"]):
        print_env(state)
        return 0
    log("not running")
    return 1


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in ("start", "stop", "status"):
        print(__doc__, file=sys.stderr)
        return 2
    p = Paths()
    p.root.mkdir(parents=True, exist_ok=True)
    with open(p.lock, "w") as lock:
        # One launcher at a time per cache: they share the cluster and the venv.
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return {"start": start, "stop": stop, "status": status}[sys.argv[1]](p)
        except Failed as e:
            log(f"ERROR: {e}")
            return 1


if __name__ == "__main__":
    sys.exit(main())
