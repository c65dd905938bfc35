#!/usr/bin/env bash
# Broker throughput for auto-approved GitHub token requests answered from the token-reuse
# cache, with every request's audit events flushed to disk before the answer, over loopback
# keep-alive HTTP, driven by wrk in a separate process.
#
#   bench/throughput.sh [duration=20s] [connections=64] [threads=2]
#
# Prints requests/s, latency percentiles, the broker's peak RSS (VmHWM) and how many tokens
# it minted upstream (the simulated GitHub of --dev) during the run.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-20s}
connections=${2:-64}
threads=${3:-2}

if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk
fi
cargo build --release -p botcreds-broker --locked
bin=target/release/botcreds
port=${BENCH_PORT:-18443}
log=$(mktemp)
RUST_LOG=warn "$bin" serve --dev --listen "127.0.0.1:$port" 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log" "$lua"' EXIT
for _ in $(seq 1 100); do
  grep -q 'API key:' "$log" && curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  sleep 0.1
done
key=$(sed -n 's/.*API key: *//p' "$log" | head -1)
[ -n "$key" ] || { echo "broker did not start:"; cat "$log"; exit 1; }

lua=$(mktemp --suffix=.lua)
cat >"$lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
wrk.body = '{"kind":"github_token","repositories":["demo-org/app"],"permissions":["contents:write"],"reason":"bench"}'
done = function(summary, latency, requests)
  io.write(string.format("non-2xx or errors: %d\n", summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
  for _, p in pairs({50, 90, 99, 99.9}) do
    io.write(string.format("p%s latency: %.2f ms\n", p, latency:percentile(p) / 1000))
  end
end
LUA
# Warm the reuse cache (one mint), then measure.
curl -sf -o /dev/null "http://127.0.0.1:$port/v1/credentials" -H "Authorization: Bearer $key" \
  -H 'Content-Type: application/json' \
  -d '{"kind":"github_token","repositories":["demo-org/app"],"permissions":["contents:write"]}'
wrk -t"$threads" -c"$connections" -d"$duration" --latency -s "$lua" "http://127.0.0.1:$port/v1/credentials"
echo "broker peak RSS: $(grep VmHWM /proc/$pid/status | awk '{print $2/1024 " MiB"}')"
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^botcreds_(github_token_mints_total|token_reuse_total|credential_requests_total)' || true
audit_events=$(du -sh "$(sed -n 's/.*Data dir: *\([^ ]*\).*/\1/p' "$log")" 2>/dev/null | cut -f1 || true)
echo "data dir size after run: ${audit_events:-?}"
