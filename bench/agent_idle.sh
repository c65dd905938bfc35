#!/usr/bin/env bash
# The agent's footprint (release build): resident memory after start and after serving git, every
# wake-up while it idles, and the git helper's peak RSS.
#
#   bench/agent_idle.sh [idle seconds=10] [git requests=1000] [traced seconds=100]
#
# Wake-ups, two ways:
# 1. A timeline: `strace -f -ttt -p` for `traced` seconds from just after start-up (the fetch of
#    the configured token, then `requests` git requests), each wake-up classified: an epoll_wait
#    that returns 0 is a timer; one that returns events is I/O; anything else is named.
# 2. A quiet window of `idle` seconds after that, in which no credential's timer is due: the sum
#    of voluntary + nonvoluntary context switches over all the agent's threads
#    (/proc/PID/task/*/status) must not move, and `strace -c -f -p` over a second such window
#    must see no system call. A control request after it shows that the counter does move.
# Exit status 1 if the agent's peak RSS exceeds 16 MiB or it wakes up in the quiet window.
set -euo pipefail
cd "$(dirname "$0")/.."
idle=${1:-10}
requests=${2:-1000}
traced=${3:-100}

. bench/agent_env.sh
bench_install
bench_build
trap bench_cleanup EXIT
bench_start_agent
agent=target/release/botcreds-agent
status=0

mem() {
  awk '/^(VmRSS|VmHWM|RssAnon|RssFile|Threads):/ { printf "%s %s %s  ", $1, $2, $3 } END { print "" }' \
    "/proc/$AGENT_PID/status"
}
switches() {
  cat /proc/"$AGENT_PID"/task/*/status | awk '/ctxt_switches/ { s += $2 } END { print s }'
}

echo "== machine"
echo "$(nproc) CPUs, kernel $(uname -r), load: $(uptime)"
echo "agent binary $(stat -c %s "$agent") bytes, helper binary $(stat -c %s "$HELPER") bytes (line-table debug info included)"

strace -f -ttt -T -o "$BENCH_TMP/timeline.strace" -p "$AGENT_PID" 2>/dev/null &
tracer=$!
# strace is attached once it has stopped the agent's thread and resumed it: wait for TracerPid.
traced_now() { [ "$(awk '/^TracerPid:/ { print $2 }' "/proc/$AGENT_PID/status")" = "$tracer" ]; }
bench_wait_for traced_now || { echo "strace did not attach" >&2; exit 1; }
trace_start=$(date +%s.%N)

echo
echo "== agent memory"
echo "after start and first fetch:  $(mem)"
for _ in $(seq 1 "$requests"); do "$HELPER" get <"$BENCH_INPUT" >/dev/null; done
echo "after $requests git requests: $(mem)"
hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$AGENT_PID/status")
if [ "$hwm" -le $((16 * 1024)) ]; then
  echo "peak RSS $((hwm / 1024)).$(((hwm % 1024) * 10 / 1024)) MiB <= 16 MiB: PASS"
else
  echo "peak RSS $hwm KiB > 16 MiB: FAIL"
  status=1
fi

echo
echo "== agent wake-ups: timeline of the first ${traced}s (t = seconds since the token was fetched)"
last_request=$(date +%s.%N)
sleep "$(python3 -c "print(max(0.0, $trace_start + $traced - $last_request))")" # the traced period itself
kill -INT "$tracer"
wait "$tracer" || true
fetched=$(sed -n 's/^\([0-9TZ:.-]*\) .*credential fetched.*/\1/p' "$BENCH_TMP/agent.log" | head -1)
python3 - "$BENCH_TMP/timeline.strace" "$fetched" "$last_request" <<'PY'
import re, sys
from datetime import datetime

path, fetched, last_request = sys.argv[1], sys.argv[2], float(sys.argv[3])
t0 = datetime.fromisoformat(fetched.replace("Z", "+00:00")).timestamp()
# strace stamps a complete line at the call's entry (-T adds its duration) and a resumed one at
# its return; wake-ups are returns.
line_re = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(<\.\.\. )?(\w+)(?: resumed>)?(.*?)(?:\s+<(\d+\.\d+)>)?\s*$")
wakeups = []  # (t, tid, what)
for line in open(path):
    m = line_re.match(line)
    if not m or "<unfinished" in line or "<detached" in line:
        continue
    tid, t, resumed, call, rest, dur = m.groups()
    t = float(t) if resumed or dur is None else float(t) + float(dur)
    # The git requests are load, not idling.
    if t <= last_request:
        continue
    result = rest.rsplit("=", 1)[-1].strip()
    if call == "epoll_wait":
        what = "timer (epoll_wait timed out)" if result == "0" else f"I/O (epoll_wait: {result} event)"
    elif call in ("futex", "restart_syscall") and "ETIMEDOUT" in rest:
        what = "timer (futex timed out)"
    elif call == "exit":
        what = "the thread exits"
    elif call == "recvfrom" and result == "0":
        what = "  (a peer closed its connection: recvfrom = 0)"
    else:
        continue
    wakeups.append((t, tid, what))
print(f"the git requests ended at t={last_request - t0:.3f}")
if not wakeups:
    print("no wake-ups after them")
for t, tid, what in sorted(wakeups):
    print(f"t={t - t0:8.3f}  thread {tid}: {what}")
PY

echo
echo "== agent wake-ups in a quiet window of ${idle}s"
echo "threads: $(for t in /proc/"$AGENT_PID"/task/*; do printf '%s ' "$(cat "$t/comm")"; done)"
before=$(switches)
sleep "$idle" # the measurement window itself
after=$(switches)
woke=$((after - before))
echo "context switches in ${idle}s: $woke (voluntary + nonvoluntary, all threads)"
if [ "$woke" -eq 0 ]; then echo "no wake-ups: PASS"; else echo "woke up $woke times: FAIL"; status=1; fi
echo "strace -c -f -p over ${idle}s:"
trace=$(timeout -s INT "$idle" strace -c -f -p "$AGENT_PID" 2>&1 || true)
if grep -q 'calls' <<<"$trace"; then sed 's/^/  /' <<<"$trace"; else echo "  no system calls"; fi
before=$(switches)
"$HELPER" get <"$BENCH_INPUT" >/dev/null
echo "control: one git request costs the agent $(($(switches) - before)) context switches"
# After the windows: a status request makes the agent probe the broker (a connection that the
# broker closes 10 s later, and the HTTP client's 90 s idle sweep), which would wake it.
"$agent" status --json | python3 -c '
import json, sys
for c in json.load(sys.stdin)["credentials"]:
    repos = ",".join(c["repositories"])
    print("its timers: refresh of", c["host"], repos, "at", c["next_refresh"], "state", c["state"])'

echo
echo "== git-credential-botcreds peak RSS (/usr/bin/time, 20 runs each)"
mkdir -m 700 "$BENCH_TMP/cache-daemon"
CACHE_SOCKET="$BENCH_TMP/cache-daemon/socket"
printf 'protocol=https\nhost=github.com\npath=demo-org/app.git\nusername=x\npassword=y\n\n' |
  git credential-cache --timeout 3600 --socket "$CACHE_SOCKET" store
peak() {
  local i
  for i in $(seq 1 20); do /usr/bin/time -f %M "$@" <"$BENCH_INPUT" 2>&1 >/dev/null | tail -1; done |
    sort -n | awk '{ a[NR] = $1 } END { printf "median %d KiB, max %d KiB\n", a[int((NR + 1) / 2)], a[NR] }'
}
echo "git-credential-botcreds get:       $(peak "$HELPER" get)"
echo "git credential-cache get (warm):   $(peak git credential-cache --socket "$CACHE_SOCKET" get)"
echo "floor: sh -c 'echo ...; echo ...': $(peak /bin/sh -c 'echo username=x; echo password=y')"
exit $status
