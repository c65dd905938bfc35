# Shared setup for the agent benchmarks (sourced by bench/git_helper.sh and bench/agent_idle.sh):
# installs what is missing, builds release binaries, and starts a dev broker plus an agent whose
# cache already holds the token, all in a temporary directory that is removed on exit.
#
# After `bench_start_agent`: $BENCH_TMP, $AGENT_PID, $BROKER_PID, $HELPER (absolute path of
# git-credential-botcreds), $BENCH_INPUT (git's credential request), and BOTCREDS_AGENT_SOCKET
# exported. git runs with a private HOME and no system config, so the user's own credential
# helpers never take part.

bench_install() {
  # Debian package names for the commands the benchmarks need.
  local missing=()
  command -v hyperfine >/dev/null 2>&1 || missing+=(hyperfine)
  [ -x /usr/bin/time ] || missing+=(time)
  command -v strace >/dev/null 2>&1 || missing+=(strace)
  command -v git >/dev/null 2>&1 || missing+=(git)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  command -v python3 >/dev/null 2>&1 || missing+=(python3)
  if [ ${#missing[@]} -gt 0 ]; then
    local sudo=
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
  fi
}

bench_build() {
  cargo build --release -p botcreds-agent -p botcreds-broker --locked
}

bench_cleanup() {
  [ -n "${AGENT_PID:-}" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null
  [ -n "${BROKER_PID:-}" ] && kill "$BROKER_PID" 2>/dev/null && wait "$BROKER_PID" 2>/dev/null
  if [ -n "${CACHE_SOCKET:-}" ] && [ -S "$CACHE_SOCKET" ]; then
    git credential-cache --socket "$CACHE_SOCKET" exit 2>/dev/null
  fi
  [ -n "${BENCH_TMP:-}" ] && rm -rf "$BENCH_TMP"
  return 0
}

# Waits up to ~10 s for a command to succeed (polling a readiness condition).
bench_wait_for() {
  local i
  for i in $(seq 1 200); do
    if "$@"; then return 0; fi
    sleep 0.05
  done
  return 1
}

bench_start_agent() {
  local root
  root=$(pwd)
  BENCH_TMP=$(mktemp -d /tmp/botcreds-bench.XXXXXX)
  chmod 700 "$BENCH_TMP"
  export HOME="$BENCH_TMP/home" GIT_CONFIG_NOSYSTEM=1 GIT_TERMINAL_PROMPT=0
  mkdir -p "$HOME"
  HELPER="$root/target/release/git-credential-botcreds"
  local port
  port=${BENCH_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

  RUST_LOG=warn "$root/target/release/botcreds" serve --dev --listen "127.0.0.1:$port" \
    2>"$BENCH_TMP/broker.log" &
  BROKER_PID=$!
  broker_up() {
    grep -q 'API key:' "$BENCH_TMP/broker.log" && curl -sf "http://127.0.0.1:$port/healthz" >/dev/null
  }
  bench_wait_for broker_up || { echo "broker did not start:" >&2; cat "$BENCH_TMP/broker.log" >&2; return 1; }
  (umask 077 && sed -n 's/.*API key: *//p' "$BENCH_TMP/broker.log" | head -1 >"$BENCH_TMP/api.key")

  cat >"$BENCH_TMP/agent.toml" <<EOF
broker = "http://127.0.0.1:$port"
api_key_file = "$BENCH_TMP/api.key"
cache_dir = "$BENCH_TMP/cache"
socket = "$BENCH_TMP/agent.sock"
allow_uids = [$(id -u)]

[[github]]
host = "github.com"
repositories = ["demo-org/app"]
permissions = ["contents:write"]
reason = "benchmark"
EOF
  export BOTCREDS_AGENT_SOCKET="$BENCH_TMP/agent.sock"
  RUST_LOG=info "$root/target/release/botcreds-agent" run --config "$BENCH_TMP/agent.toml" \
    2>"$BENCH_TMP/agent.log" &
  AGENT_PID=$!
  agent_up() { grep -q 'agent ready' "$BENCH_TMP/agent.log"; }
  bench_wait_for agent_up || { echo "agent did not start:" >&2; cat "$BENCH_TMP/agent.log" >&2; return 1; }

  BENCH_INPUT="$BENCH_TMP/request"
  printf 'protocol=https\nhost=github.com\npath=demo-org/app.git\n' >"$BENCH_INPUT"
  # The agent fetches its configured token at startup; the helper's own bounded wait covers the
  # fetch, so one answer with a password means the agent is warm.
  "$HELPER" get <"$BENCH_INPUT" | grep -q '^password=ghs_' || {
    echo "the agent gave no credential:" >&2; cat "$BENCH_TMP/agent.log" >&2; return 1
  }
}
