#!/usr/bin/env bash
# `git credential fill` through git-credential-botcreds with a warm agent, side by side in one run
# with git's own git-credential-cache (warm daemon) and with the floor: a one-line shell script
# printing a fixed credential. Each helper is measured configured two ways, because how git
# spawns a helper matters: a bare name (`botcreds`, `cache`) makes git run `git credential-NAME`,
# one more git process; an absolute path (or `!cmd`) does not.
#
#   bench/git_helper.sh [rounds=40] [runs per round=50] [warmup=5]
#
# Every round runs each configuration `runs` times with hyperfine (after `warmup` runs); the
# order of the configurations rotates from round to round. Many short rounds rather than a few
# long ones: a burst of other load on the machine (seconds long) then spans every configuration
# of a round instead of landing on one configuration's block, which would decide its p99 alone. percentiles.py merges the rounds and prints
# median and p99 per configuration and the ratios. Exit status 1 if botcreds (absolute path) is
# slower than git-credential-cache as git users configure it (`cache --socket ...`) on median or
# p99. Keep the JSON with BENCH_KEEP=DIR.
#
# BENCH_STATIC=1 adds the helper linked statically (glibc, `-C target-feature=+crt-static`), built
# with `cargo rustc --target <host>` into target/<host>/release (the first time compiles the
# agent's dependencies once more), to show what dynamic loading costs per lookup.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-40}
runs=${2:-50}
warmup=${3:-5}

. bench/agent_env.sh
bench_install
bench_build
static_helper=
if [ "${BENCH_STATIC:-0}" = 1 ]; then
  host=$(rustc -vV | sed -n 's/^host: //p')
  cargo rustc --release --locked -p botcreds-agent --bin git-credential-botcreds --target "$host" \
    -- -C target-feature=+crt-static
  static_helper="$(pwd)/target/$host/release/git-credential-botcreds"
fi
trap bench_cleanup EXIT
bench_start_agent

# git-credential-cache's daemon, warm: started by the first `store`, kept for a day.
mkdir -m 700 "$BENCH_TMP/cache-daemon"
CACHE_SOCKET="$BENCH_TMP/cache-daemon/socket"
printf 'protocol=https\nhost=github.com\npath=demo-org/app.git\nusername=x-access-token\npassword=ghs_cached_by_git_credential_cache\n\n' |
  git credential-cache --timeout 86400 --socket "$CACHE_SOCKET" store

# The floor: the cheapest helper git can run, by absolute path, and inline as a shell function.
floor="$BENCH_TMP/floor-helper"
printf '#!/bin/sh\necho username=x; echo password=y\n' >"$floor"
chmod 755 "$floor"
inline='!f() { echo username=x; echo password=y; }; f'

# For the bare name, git finds git-credential-botcreds in $PATH.
mkdir "$BENCH_TMP/bin"
ln -s "$HELPER" "$BENCH_TMP/bin/git-credential-botcreds"
export PATH="$BENCH_TMP/bin:$PATH"

names=(
  "botcreds, absolute path"
  "botcreds, bare name"
  "cache, bare name"
  "cache, absolute path"
  "floor, one-line script"
  "floor, inline !function"
)
helpers=(
  "$HELPER"
  "botcreds"
  "cache --socket $CACHE_SOCKET"
  "$(git --exec-path)/git-credential-cache --socket $CACHE_SOCKET"
  "$floor"
  "$inline"
)
expect=(ghs_ ghs_ ghs_cached ghs_cached y y)
if [ -n "$static_helper" ]; then
  names+=("botcreds, absolute path, static")
  helpers+=("$static_helper")
  expect+=(ghs_)
fi

fill() {
  git -c credential.helper= -c "credential.helper=$1" -c credential.useHttpPath=true credential fill
}
# Each configuration must answer through the helper under test, not through a prompt.
for i in "${!names[@]}"; do
  out=$(fill "${helpers[$i]}" <"$BENCH_INPUT")
  grep -q "^password=${expect[$i]}" <<<"$out" || { echo "${names[$i]}: unexpected answer" >&2; exit 1; }
done

echo "== machine"
echo "$(nproc) CPUs, $(sed -n 's/^model name\t*: //p' /proc/cpuinfo | head -1), kernel $(uname -r)"
echo "$(git --version), $(hyperfine --version), /bin/sh -> $(readlink -f /bin/sh)"
echo "helper binary: $(stat -c %s "$HELPER") bytes"
echo "load before: $(uptime)"

out="$BENCH_TMP/json"
mkdir "$out"
n=${#names[@]}
for r in $(seq 0 $((rounds - 1))); do
  args=()
  for k in $(seq 0 $((n - 1))); do
    i=$(((k + r) % n))
    # hyperfine runs each command with `sh -c` and subtracts the shell's own start-up time.
    args+=(-n "${names[$i]}"
      "git -c credential.helper= -c 'credential.helper=${helpers[$i]}' -c credential.useHttpPath=true credential fill <'$BENCH_INPUT'")
  done
  echo "== round $((r + 1))/$rounds"
  hyperfine --warmup "$warmup" --runs "$runs" --style basic --export-json "$out/round$r.json" "${args[@]}" |
    grep -E '^(Benchmark|  Time)'
done
echo "load after:  $(uptime)"
[ -n "${BENCH_KEEP:-}" ] && mkdir -p "$BENCH_KEEP" && cp "$out"/*.json "$BENCH_KEEP"/

echo
echo "== git credential fill, $((rounds * runs)) runs per configuration"
status=0
python3 bench/percentiles.py --ours "botcreds, absolute path" \
  --require-le "cache, bare name" \
  --vs "cache, absolute path" --vs "floor, one-line script" --vs "floor, inline !function" \
  "$out"/round*.json || status=$?
echo
python3 bench/percentiles.py --ours "botcreds, bare name" \
  --vs "cache, bare name" --vs "botcreds, absolute path" "$out"/round*.json | tail -n +$((n + 4))
if [ "${BENCH_STATIC:-0}" = 1 ]; then
  echo
  python3 bench/percentiles.py --ours "botcreds, absolute path, static" --vs "cache, bare name" \
    --vs "botcreds, absolute path" --vs "floor, one-line script" "$out"/round*.json | tail -n +$((n + 4))
fi
exit $status
