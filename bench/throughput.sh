#!/usr/bin/env bash
# Broker throughput for auto-approved GitHub token requests answered from the token-reuse
# cache, with every request's audit events flushed to disk before the answer, over loopback
# keep-alive HTTP, driven by wrk in a separate process — measured side by side with its
# physical reference: a bare axum JSON echo of the same request (bench/echo, same axum, hyper
# and tokio), under the same wrk parameters.
#
#   bench/throughput.sh [duration=10s] [connections=32] [threads=1] [rounds=3]
#
# BENCH_BROKER=<binary> measures another build of the broker (say, the one before a change).
# Each round runs the echo, then the broker, back to back (the machine is shared and noisy, so
# they are interleaved and the medians compared). Prints per round and as medians: requests/s,
# p50/p99, the broker's throughput as a ratio of the echo's, and the broker's disk bytes per
# request (growth of its data directory, apparent size, divided by the requests of the run).
# Then the broker's peak RSS and how many tokens it minted upstream (the simulated GitHub of
# --dev). Rows go to bench/results/throughput-<date>.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-10s}
connections=${2:-32}
threads=${3:-1}
rounds=${4:-3}

if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk
fi
# One cargo invocation: the echo's dependencies resolve with the broker's features, so both run
# the same compiled axum/hyper/tokio.
# BENCH_BROKER=path measures another broker binary (an earlier build) against the same echo.
cargo build --release -p botcreds-broker -p botcreds-bench-echo --locked
bin=${BENCH_BROKER:-target/release/botcreds}
echo_bin=target/release/botcreds-bench-echo
port=${BENCH_PORT:-18443}
echo_port=$((port + 1))
log=$(mktemp)
lua=$(mktemp --suffix=.lua)
out=$(mktemp)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -f "$log" "$log.echo" "$lua" "$out"' EXIT

RUST_LOG=warn "$bin" serve --dev --listen "127.0.0.1:$port" 2>"$log" &
pid=$!
pids+=("$pid")
"$echo_bin" "127.0.0.1:$echo_port" 2>"$log.echo" &
pids+=("$!")
for _ in $(seq 1 100); do
  grep -q 'API key:' "$log" && curl -sf "http://127.0.0.1:$port/healthz" >/dev/null &&
    grep -q 'listening' "$log.echo" && break
  sleep 0.1
done
key=$(sed -n 's/.*API key: *//p' "$log" | head -1)
[ -n "$key" ] || { echo "broker did not start:"; cat "$log"; exit 1; }
grep -q 'listening' "$log.echo" || { echo "echo did not start:"; cat "$log.echo"; exit 1; }
data=$(sed -n 's/.*Data dir: *\([^ ]*\).*/\1/p' "$log" | head -1)

body='{"kind":"github_token","repositories":["demo-org/app"],"permissions":["contents:write"],"reason":"bench"}'
cat >"$lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
wrk.body = '$body'
done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT %d %.1f %.3f %.3f %.3f %d\n", summary.requests,
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, latency:percentile(99.9) / 1000, errors))
end
LUA
# Both answer the request: the echo with it, the broker with a token.
curl -sf -o /dev/null "http://127.0.0.1:$echo_port/v1/credentials" -H 'Content-Type: application/json' -d "$body"
# Warm the reuse cache (one mint), then measure.
curl -sf -o /dev/null "http://127.0.0.1:$port/v1/credentials" -H "Authorization: Bearer $key" \
  -H 'Content-Type: application/json' -d "$body"

csv=bench/results/throughput-$(date -u +%Y%m%dT%H%M%SZ).csv
mkdir -p bench/results
echo "round,target,connections,requests,requests_per_s,p50_ms,p99_ms,p999_ms,errors,disk_bytes_per_request" >"$csv"
run() { # target port round
  local before=0 after=0 per=
  [ "$1" = broker ] && before=$(du -sb "$data" | cut -f1)
  wrk -t"$threads" -c"$connections" -d"$duration" -s "$lua" "http://127.0.0.1:$2/v1/credentials" >"$out"
  local result
  result=$(sed -n 's/^RESULT //p' "$out")
  [ -n "$result" ] || { cat "$out"; exit 1; }
  set -- "$1" "$2" "$3" $result
  if [ "$1" = broker ]; then
    after=$(du -sb "$data" | cut -f1)
    per=$(( (after - before) / $4 ))
  fi
  echo "$3,$1,$connections,$4,$5,$6,$7,$8,$9,$per" >>"$csv"
  printf '  round %s %-6s %9.0f req/s  p50 %6.2f ms  p99 %6.2f ms  p99.9 %6.2f ms  errors %s%s\n' \
    "$3" "$1" "$5" "$6" "$7" "$8" "$9" "${per:+  disk $per B/request}"
}
echo "wrk -t$threads -c$connections -d$duration, $rounds rounds (echo, then broker):"
for round in $(seq 1 "$rounds"); do
  run echo "$echo_port" "$round"
  run broker "$port" "$round"
done
python3 - "$csv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
def med(target, col):
    return statistics.median(float(r[col]) for r in rows if r["target"] == target)
ratios = [float(b["requests_per_s"]) / float(e["requests_per_s"])
          for e, b in zip(rows[0::2], rows[1::2])]
print(f"medians: echo {med('echo', 'requests_per_s'):.0f} req/s (p99 {med('echo', 'p99_ms'):.2f} ms), "
      f"broker {med('broker', 'requests_per_s'):.0f} req/s (p99 {med('broker', 'p99_ms'):.2f} ms)")
print(f"broker / echo throughput: {statistics.median(ratios):.1%} median of rounds "
      f"({', '.join(f'{r:.1%}' for r in ratios)})")
print(f"broker disk per request: {med('broker', 'disk_bytes_per_request'):.0f} bytes (median)")
PY
echo "rows: $csv"
echo "broker peak RSS: $(grep VmHWM /proc/$pid/status | awk '{print $2/1024 " MiB"}')"
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^botcreds_(github_token_mints_total|token_reuse_total|credential_requests_total)' || true
echo "data dir size after run: $(du -sh "$data" | cut -f1)"
