#!/usr/bin/env bash
# Soak: the broker (release build, --dev, simulated GitHub) at a steady moderate rate for a long
# run over 50 distinct token scopes, with every request's audit events flushed before the
# answer. Samples the broker's RSS, open file descriptors and data-dir size every 10 s, so a
# leak shows as a slope after warm-up.
#
#   bench/soak.sh [duration_s=600] [connections=4] [delay_ms=5]
#
# Each of the `connections` wrk connections sends a request, waits `delay_ms`, and repeats.
# Writes the samples to bench/results/soak-<date>.csv and prints a summary: requests/s, and
# the RSS / fd / disk slopes over the second half of the run (per minute).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-600}
connections=${2:-4}
delay_ms=${3:-5}

if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk
fi
cargo build --release -p botcreds-broker --locked
bin=target/release/botcreds
port=${BENCH_PORT:-18444}
log=$(mktemp)
lua=$(mktemp --suffix=.lua)
RUST_LOG=warn "$bin" serve --dev --listen "127.0.0.1:$port" 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log" "$lua"' EXIT
for _ in $(seq 1 100); do
  grep -q 'API key:' "$log" && curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  sleep 0.1
done
key=$(sed -n 's/.*API key: *//p' "$log" | head -1)
data=$(sed -n 's/.*Data dir: *\([^ ]*\).*/\1/p' "$log" | head -1)
[ -n "$key" ] || { echo "broker did not start:"; cat "$log"; exit 1; }

cat >"$lua" <<LUA
-- 50 scopes: demo-org/soak-0 .. soak-49, contents:read (auto-approved by the demo policy).
local n = 0
request = function()
  n = n + 1
  local body = string.format('{"kind":"github_token","repositories":["demo-org/soak-%d"],"permissions":["contents:read"],"reason":"soak"}', n % 50)
  return wrk.format("POST", "/v1/credentials", {["Content-Type"] = "application/json", ["Authorization"] = "Bearer $key"}, body)
end
delay = function() return $delay_ms end
done = function(summary, latency, requests)
  io.write(string.format("requests: %d, non-2xx or errors: %d\n", summary.requests,
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
  io.write(string.format("p50 %.2f ms, p99 %.2f ms\n", latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
LUA

mkdir -p bench/results
csv="bench/results/soak-$(date -u +%Y%m%dT%H%M%SZ).csv"
echo "t_s,rss_kib,fds,data_kib" >"$csv"
sample() {
  local t=$1
  echo "$t,$(awk '/VmRSS/ {print $2}' /proc/$pid/status),$(ls /proc/$pid/fd | wc -l),$(du -sk "$data" | cut -f1)" >>"$csv"
}
wrk -t1 -c"$connections" -d"${duration}s" -s "$lua" "http://127.0.0.1:$port/" >"$log.wrk" 2>&1 &
wrk_pid=$!
start=$(date +%s)
while kill -0 $wrk_pid 2>/dev/null; do
  sample $(( $(date +%s) - start ))
  sleep 10
done
sample $(( $(date +%s) - start ))
cat "$log.wrk"; rm -f "$log.wrk"
python3 - "$csv" "$duration" <<'PY'
import csv, sys
rows = [tuple(map(int, r.values())) for r in csv.DictReader(open(sys.argv[1]))]
half = [r for r in rows if r[0] >= rows[-1][0] / 2]
def slope(i):
    (t0, *a), (t1, *b) = half[0], half[-1]
    return (b[i - 1] - a[i - 1]) / max(t1 - t0, 1) * 60
print(f"samples: {len(rows)} over {rows[-1][0]} s -> {sys.argv[1]}")
print(f"RSS: start {rows[0][1]/1024:.1f} MiB, after warm-up {half[0][1]/1024:.1f} MiB, end {rows[-1][1]/1024:.1f} MiB, "
      f"max {max(r[1] for r in rows)/1024:.1f} MiB; second-half slope {slope(1)/1024:+.2f} MiB/min")
print(f"fds: start {rows[0][2]}, end {rows[-1][2]}, max {max(r[2] for r in rows)}; second-half slope {slope(2):+.2f}/min")
print(f"data dir: start {rows[0][3]/1024:.1f} MiB, end {rows[-1][3]/1024:.1f} MiB; second-half slope {slope(3)/1024:+.2f} MiB/min")
PY
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^botcreds_(github_token_mints_total|credential_requests_total)' || true
