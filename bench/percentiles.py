#!/usr/bin/env python3
"""Merges hyperfine --export-json files (several rounds of the same commands) and prints, per
command, the run count and the mean, median, p90, p99 and max wall time, then the ratios of one
command to others on median and p99.

    percentiles.py --ours NAME --vs NAME [--vs NAME ...] [--require-le NAME ...] FILE.json...

--require-le NAME: exit 1 unless ours/NAME <= 1.0 on both median and p99.
Percentiles are nearest-rank over all runs of all files (p99 of 1000 runs = the 990th fastest).
"""

import argparse
import json
import math
import sys


def percentile(sorted_times, p):
    rank = max(1, math.ceil(p / 100 * len(sorted_times)))
    return sorted_times[rank - 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--vs", action="append", default=[])
    ap.add_argument("--require-le", action="append", default=[])
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()

    times = {}
    order = []
    for path in args.files:
        with open(path) as f:
            for result in json.load(f)["results"]:
                name = result["command"]
                if name not in times:
                    times[name] = []
                    order.append(name)
                times[name].extend(result["times"])

    stats = {}
    for name in order:
        t = sorted(times[name])
        stats[name] = {
            "n": len(t),
            "mean": sum(t) / len(t),
            "median": percentile(t, 50),
            "p90": percentile(t, 90),
            "p99": percentile(t, 99),
            "max": t[-1],
        }

    def ms(x):
        return f"{x * 1000:.2f}"

    print("| helper configuration | runs | mean ms | median ms | p90 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in order:
        s = stats[name]
        print(
            f"| {name} | {s['n']} | {ms(s['mean'])} | {ms(s['median'])} | {ms(s['p90'])} "
            f"| {ms(s['p99'])} | {ms(s['max'])} |"
        )
    print()

    for name in [args.ours, *args.vs, *args.require_le]:
        if name not in stats:
            sys.exit(f"percentiles.py: no command named {name!r} in the JSON files")

    ours = stats[args.ours]
    failed = False
    print("| ratio | median | p99 | difference in median |")
    print("|---|---:|---:|---:|")
    for other_name in dict.fromkeys([*args.require_le, *args.vs]):
        other = stats[other_name]
        r_med = ours["median"] / other["median"]
        r_p99 = ours["p99"] / other["p99"]
        diff = (ours["median"] - other["median"]) * 1000
        verdict = ""
        if other_name in args.require_le:
            ok = r_med <= 1.0 and r_p99 <= 1.0
            failed |= not ok
            verdict = " (required <= 1.0: " + ("PASS" if ok else "FAIL") + ")"
        print(
            f"| {args.ours} / {other_name}{verdict} | {r_med:.3f} | {r_p99:.3f} | {diff:+.2f} ms |"
        )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
