#!/usr/bin/env bash
# `botcreds pending` against a release broker holding 10,000 pending approval requests.
#
#   bench/approvals_pending.sh [requests=10000] [runs=30]
#
# Starts `botcreds serve` on a temp data dir (the GitHub App is never called: pending requests
# need no token), creates the requests over one keep-alive connection (distinct repositories,
# so none are deduplicated), then times the whole CLI command — process start, the admin GET,
# JSON decoding and the table (or --json) — and prints median, p90, p99 and max wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-10000}
runs=${2:-30}

cargo build --release -p botcreds-broker --locked
bin=$PWD/target/release/botcreds
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
cp tests/fixtures/github/test-app-key.pem "$dir/app-key.pem"
chmod 600 "$dir/app-key.pem"
port=${BENCH_PORT:-18444}
bot_key=bck_benchBotKey0123456789abcdefghijklm
ops_key=bck_benchOpsKey0123456789abcdefghijklm
cat >"$dir/policy.yaml" <<'YAML'
bots:
  bench-bot:
    identity: { type: api_key }
    requires_approval:
      - repo: "bench-org/*"
        permissions: [contents:write]
defaults:
  requires_approval: true
  approval_timeout: 24h
YAML
cat >"$dir/broker.toml" <<TOML
listen = ["127.0.0.1:$port"]
data_dir = "data"
policy = "policy.yaml"

[tailscale]
enabled = false

[github]
app_id = 912345
private_key_file = "app-key.pem"
api_url = "http://127.0.0.1:9"

[[api_keys]]
bot = "bench-bot"
key_env = "BENCH_BOT_KEY"

[[api_keys]]
bot = "ops"
key_env = "BENCH_OPS_KEY"

[admin]
api_key_bots = ["ops"]

[approvals]
max_pending_per_bot = $requests
max_pending = $requests
TOML
BENCH_BOT_KEY=$bot_key BENCH_OPS_KEY=$ops_key RUST_LOG=warn "$bin" serve --config "$dir/broker.toml" 2>"$dir/log" &
pid=$!
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  sleep 0.1
done

python3 - "$port" "$bot_key" "$requests" <<'PY'
import http.client, json, sys
port, key, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", port)
for i in range(n):
    body = json.dumps({"kind": "github_token", "repositories": [f"bench-org/repo-{i}"],
                       "permissions": ["contents:write"], "reason": "bench"})
    c.request("POST", "/v1/credentials", body,
              {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    r = c.getresponse()
    r.read()
    if r.status != 202:
        sys.exit(f"request {i}: HTTP {r.status}")
print(f"{n} pending approval requests created")
PY

python3 - "$bin" "http://127.0.0.1:$port" "$ops_key" "$runs" <<'PY'
import math, os, subprocess, sys, time
binary, broker, key, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
env = dict(os.environ, BOTCREDS_BROKER=broker, BOTCREDS_API_KEY=key)
def pct(xs, p):
    return xs[max(1, math.ceil(p / 100 * len(xs))) - 1]
for args in (["pending"], ["pending", "--json"]):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([binary, *args], env=env, stdout=subprocess.DEVNULL, check=True)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    print(f"botcreds {' '.join(args)}: runs {runs}, median {pct(times, 50):.1f} ms, "
          f"p90 {pct(times, 90):.1f} ms, p99 {pct(times, 99):.1f} ms, max {times[-1]:.1f} ms")
PY
