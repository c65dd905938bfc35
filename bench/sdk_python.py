#!/usr/bin/env python3
"""Driver of bench/sdk_python.sh: starts `botcreds serve --dev`, measures, prints a table."""

import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("BOTCREDS_BIN", ROOT / "target" / "debug" / "botcreds"))
BODY = '{"kind":"github_token","repositories":["demo-org/app"],"permissions":["contents:read"],"reason":"bench"}'


def pct(times, p):
    s = sorted(times)
    return s[max(1, math.ceil(p / 100 * len(s))) - 1]


def start_dev():
    tmp = tempfile.mkdtemp(prefix="botcreds-bench-")
    proc = subprocess.Popen(
        [str(BIN), "serve", "--dev", "--listen", "127.0.0.1:0"],
        cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={"PATH": os.environ["PATH"], "RUST_LOG": "warn"},
    )
    found = {}
    for line in proc.stdout:
        m = re.match(r"\s+(API key|Listening on):\s+(\S+)", line)
        if m:
            found[m.group(1)] = m.group(2)
        if len(found) == 2:
            break
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, found["Listening on"], found["API key"]


def timed(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    calls, rounds = int(sys.argv[1]), int(sys.argv[2])
    proc, url, key = start_dev()
    py = sys.executable
    results = {}
    try:
        import botcreds

        warm = botcreds.BrokerClient(url, "demo-bot", key)
        ask = dict(repo="demo-org/app", permissions=["contents:read"], reason="bench")
        warm.get_credentials(**ask)  # mint once; every measured call reuses the token

        def new_client():
            with botcreds.BrokerClient(url, "demo-bot", key) as c:
                c.get_credentials(**ask)

        curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
                f"{url}/v1/credentials", "-H", f"Authorization: Bearer {key}",
                "-H", "Content-Type: application/json", "-d", BODY]

        def curl_total():
            out = subprocess.run(curl, capture_output=True, text=True, check=True).stdout.split()
            assert out[0] == "200", out
            return float(out[1])

        proc_py = [py, "-c", "import botcreds,sys; botcreds.BrokerClient(sys.argv[1], 'demo-bot', sys.argv[2])"
                   ".get_credentials(repo='demo-org/app', permissions=['contents:read'], reason='bench')",
                   url, key]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        for r in range(rounds):
            # Rotate the order so a burst of other load does not land on one configuration only.
            steps = [
                ("python: warm client, in process", lambda: timed(lambda: warm.get_credentials(**ask), calls)),
                ("python: new client per call, in process", lambda: timed(new_client, calls)),
                ("curl: time_total (new connection)", lambda: [curl_total() for _ in range(calls)]),
                ("process: curl", lambda: timed(lambda: subprocess.run(curl, capture_output=True, check=True), calls // 4)),
                ("process: python -c get_credentials", lambda: timed(lambda: subprocess.run(proc_py, capture_output=True, check=True, env=env), calls // 4)),
                ("process: python -c 'import botcreds'", lambda: timed(lambda: subprocess.run([py, "-c", "import botcreds"], check=True, env=env), calls // 4)),
                ("process: python -c 'import httpx'", lambda: timed(lambda: subprocess.run([py, "-c", "import httpx"], check=True, env=env), calls // 4)),
                ("process: python -c pass", lambda: timed(lambda: subprocess.run([py, "-c", "pass"], check=True, env=env), calls // 4)),
            ]
            k = r % len(steps)
            for name, fn in steps[k:] + steps[:k]:
                results.setdefault(name, []).extend(fn())
        imports = []
        for _ in range(20):
            err = subprocess.run([py, "-X", "importtime", "-c", "import botcreds"], capture_output=True,
                                 text=True, check=True, env=env).stderr
            line = [l for l in err.splitlines() if l.rstrip().endswith("| botcreds")][-1]
            imports.append(int(line.split("|")[1]) / 1e6)
    finally:
        proc.terminate()
        proc.wait()
    print(f"broker: {BIN} (dev mode); python {sys.version.split()[0]}; {calls} calls x {rounds} rounds")
    print(f"`python -X importtime`: import botcreds (cumulative, 20 runs) median {statistics.median(imports)*1e3:.1f} ms, max {max(imports)*1e3:.1f} ms")
    print("| measurement | runs | p50 | p99 |")
    print("|---|---|---|---|")
    for name, ts in results.items():
        print(f"| {name} | {len(ts)} | {pct(ts, 50)*1e3:.2f} ms | {pct(ts, 99)*1e3:.2f} ms |")


if __name__ == "__main__":
    main()
