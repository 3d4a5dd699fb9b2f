#!/usr/bin/env python3
"""Simulated against real: p50 / p99 TTFT and mean TPOT per policy from a `kunserve simulate
--json` report (sim) and one or more `kunserve bench --json` reports (real) of the same trace and
options. With several real runs each figure's reference is their median (the real runs on a
shared host vary more than the tolerance); the table also shows the real runs' range. Prints a
markdown table with the relative error (sim - median real) / median real and whether it is within
the tolerance (TOL env, default 0.25); exits 1 when any figure is outside it.
Usage: validate_table.py SIM REAL [REAL ...]"""
import json
import os
import statistics
import sys


def load(path):
    with open(path) as f:
        j = json.load(f)
    runs = j if isinstance(j, list) else j.get("runs", [j])
    return {r["policy"]: r for r in runs}


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sim = load(sys.argv[1])
    reals = [load(p) for p in sys.argv[2:]]
    tol = float(os.environ.get("TOL", "0.25"))
    figures = [("p50 TTFT ms", "ttft_ms", "p50"), ("p99 TTFT ms", "ttft_ms", "p99"), ("mean TPOT ms", "tpot_ms", "mean")]
    n = len(reals)
    print(f"| policy | figure | real (median of {n}) | real min-max | simulated | error vs median |")
    print("|---|---|---|---|---|---|")
    worst, outside = 0.0, 0
    for policy in reals[0]:
        if policy not in sim or any(policy not in r for r in reals):
            print(f"| {policy} | (missing in a report) | | | | |")
            outside += 1
            continue
        for name, key, stat in figures:
            values = [r[policy][key][stat] for r in reals]
            med = statistics.median(values)
            s = sim[policy][key][stat]
            err = (s - med) / med if med > 0 else float("inf")
            worst = max(worst, abs(err))
            mark = "" if abs(err) <= tol else " (outside)"
            outside += abs(err) > tol
            print(f"| {policy} | {name} | {med:.1f} | {min(values):.1f}-{max(values):.1f} | {s:.1f} | {err * 100:+.0f} %{mark} |")
    print(f"\nworst |error| {worst * 100:.0f} %; {outside} figure(s) outside {tol * 100:.0f} %")
    sys.exit(1 if outside else 0)


if __name__ == "__main__":
    main()
