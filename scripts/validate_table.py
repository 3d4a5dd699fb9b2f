#!/usr/bin/env python3
"""Simulated against real: p50 / p99 TTFT and mean TPOT per policy from a `kunserve bench --json`
report (real) and a `kunserve simulate --json` report (sim) of the same trace and options.
Prints a markdown table with the relative error (sim - real) / real and whether it is within the
tolerance; exits 1 when any figure is outside it. Usage: validate_table.py REAL SIM [TOL]"""
import json
import sys


def load(path):
    with open(path) as f:
        j = json.load(f)
    runs = j if isinstance(j, list) else j.get("runs", [j])
    return {r["policy"]: r for r in runs}


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    real, sim = load(sys.argv[1]), load(sys.argv[2])
    tol = float(sys.argv[3]) if len(sys.argv) > 3 else 0.25
    figures = [("p50 TTFT ms", "ttft_ms", "p50"), ("p99 TTFT ms", "ttft_ms", "p99"), ("mean TPOT ms", "tpot_ms", "mean")]
    print("| policy | figure | real | simulated | error |")
    print("|---|---|---|---|---|")
    worst, outside = 0.0, 0
    for policy in real:
        if policy not in sim:
            print(f"| {policy} | (not simulated) | | | |")
            outside += 1
            continue
        for name, key, stat in figures:
            r, s = real[policy][key][stat], sim[policy][key][stat]
            err = (s - r) / r if r > 0 else float("inf")
            worst = max(worst, abs(err))
            mark = "" if abs(err) <= tol else " (outside)"
            outside += abs(err) > tol
            print(f"| {policy} | {name} | {r:.1f} | {s:.1f} | {err * 100:+.0f} %{mark} |")
    print(f"\nworst |error| {worst * 100:.0f} %; {outside} figure(s) outside {tol * 100:.0f} %")
    sys.exit(1 if outside else 0)


if __name__ == "__main__":
    main()
