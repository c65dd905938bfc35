#!/usr/bin/env bash
# The Python SDK's costs, side by side with curl against the same broker in the same run:
# `import botcreds` time, and one `get_credentials` round trip (auto-approved, a reused token)
# p50/p99 — in process with a warm client, in process with a new client (new connection) per
# call, curl's own time_total per call (a new connection each), and whole processes:
# `python -c 'get_credentials'` and `curl` (spawn + connect + request).
#
#   bench/sdk_python.sh [calls per round=200] [rounds=5]
#
# Uses target/debug/botcreds (BOTCREDS_BIN names another, e.g. target/release/botcreds) in dev
# mode, and the SDK's test venv (tests/python-sdk creates it; BOTCREDS_SDK_VENV names another).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${BOTCREDS_SDK_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/botcreds-tests/python-sdk-venv}
if [ ! -x "$venv/bin/python" ]; then
  echo "bench/sdk_python.sh: no venv at $venv; run tests/python-sdk first" >&2
  exit 2
fi
"$venv/bin/python" -m pip install -q --force-reinstall --no-deps ./sdk/python
exec "$venv/bin/python" bench/sdk_python.py "${1:-200}" "${2:-5}"
