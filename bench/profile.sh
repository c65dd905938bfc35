#!/usr/bin/env bash
# Where the broker's hot path spends its time: `perf record -g` on the release broker for a few
# seconds while wrk drives auto-approved, reuse-cache `POST /v1/credentials` (the request of
# bench/throughput.sh), then the top symbols (self time) and the share of a few cost classes.
#
#   bench/profile.sh [seconds=8] [connections=32] [out=target/profile]
#
# Needs `perf` (Debian: linux-perf) and kernel.perf_event_paranoid <= 1 (or root). The release
# profile keeps line tables (`debug = "line-tables-only"`), so frames resolve to symbols.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-8}
connections=${2:-32}
out=${3:-target/profile}
mkdir -p "$out"

command -v perf >/dev/null 2>&1 || { echo "perf is missing (apt-get install linux-perf)"; exit 1; }
cargo build --release -p botcreds-broker --locked
bin=target/release/botcreds
port=${BENCH_PORT:-18453}
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
[ -n "$key" ] || { echo "broker did not start:"; cat "$log"; exit 1; }
body='{"kind":"github_token","repositories":["demo-org/app"],"permissions":["contents:write"],"reason":"bench"}'
cat >"$lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $key"
wrk.body = '$body'
LUA
curl -sf -o /dev/null "http://127.0.0.1:$port/v1/credentials" -H "Authorization: Bearer $key" \
  -H 'Content-Type: application/json' -d "$body"

wrk -t1 -c"$connections" -d"$((seconds + 4))s" -s "$lua" "http://127.0.0.1:$port/v1/credentials" >"$out/wrk.txt" &
wrk_pid=$!
sleep 2
perf record -g -F 999 -p "$pid" -o "$out/perf.data" -- sleep "$seconds" 2>"$out/record.log"
wait $wrk_pid
cat "$out/wrk.txt"
perf report -i "$out/perf.data" --no-children --sort symbol --stdio --percent-limit 0.7 -g none \
  2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//; s/ *$//' | head -45 | tee "$out/top.txt"
# Self time by thread, then cost classes by self time (symbol name patterns), over all threads.
perf report -i "$out/perf.data" --no-children --sort comm --stdio -g none 2>/dev/null |
  grep '%' | grep -v '^#' | sed 's/ *$//' | tee "$out/threads.txt"
perf report -i "$out/perf.data" --no-children --sort dso,symbol --stdio -g none 2>/dev/null |
  awk '/%/ && $1 ~ /%$/ { p = $1; sub("%", "", p); line = $0;
    c = "other (broker, axum, tower code)";
    if (line ~ /futex|schedule|__switch_to|finish_task_switch|try_to_wake_up|_raw_spin_unlock_irq|pick_next|enqueue_task|dequeue_task|update_curr|psi_|select_task_rq|ttwu|do_idle|cpuidle|wake|park|sched_yield|do_sched_yield/) c = "context switches, futex, wake-ups";
    else if (line ~ /tokio::runtime|tokio::sync|mio::/) c = "tokio runtime and channels";
    else if (line ~ /malloc|free|_int_|realloc|cfree|arena|tcache|memalign|unlink_chunk|alloc::alloc/) c = "malloc/free";
    else if (line ~ /sled::/) c = "sled";
    else if (line ~ /fdatasync|fsync|sync_data|jbd2|ext4|xfs|blk_|nvme|virtio|iowrite|file_write|generic_perform_write|iomap|filemap|folio|writeback|pwrite|vfs_write[^v]/) c = "write, fdatasync, filesystem, disk";
    else if (line ~ /tcp_|ip_|__dev_queue|loopback|net_rx|netif|skb|sock_|epoll|ep_poll|sendto|recvfrom|inet_|softirq|writev|__libc_recv|__GI___libc_write|vfs_writev/) c = "TCP over loopback, epoll, syscalls";
    else if (line ~ /serde_json|serde::|serde_core|Serializer|Deserializer|itoa|ryu|zmij/) c = "JSON";
    else if (line ~ /sha2|Sha256|sha256|compress256|digest_blocks|hex::/) c = "SHA-256, hex";
    else if (line ~ /hyper|http::|httparse|h2::|bytes::/) c = "hyper, http, bytes";
    else if (line ~ /core::fmt|alloc::fmt|Display|pad_integral/) c = "string formatting";
    else if (line ~ /memcpy|memmove|memset|memcmp|strlen/) c = "memcpy/memset";
    else if (line ~ /\[k\]/) c = "other kernel";
    sum[c] += p }
    END { for (c in sum) printf "%6.1f%%  %s\n", sum[c], c }' | sort -rn | tee "$out/classes.txt"
echo "perf data: $out/perf.data (perf report -i $out/perf.data)"
