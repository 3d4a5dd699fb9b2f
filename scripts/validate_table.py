#!/usr/bin/env python3
"""Simulated against real: p50 / p99 TTFT and mean TPOT per policy from `kunserve simulate --json`
reports (sim) and `kunserve bench --json` reports (real) of the same trace and options. Each
figure's reference is the median of the real runs (on a shared host the runs vary more than the
tolerance) and the simulated figure is the median of the simulations; with as many simulations as
real runs, simulation i being real run i's (scripts/validate_sim.sh: its host contention fitted to
that run's steps), the table also shows the paired errors (sim i - real i) / real i. Prints a
markdown table with the relative error (sim median - real median) / real median and whether it is
within the tolerance (TOL env, default 0.25); exits 1 when any figure is outside it.
Usage: validate_table.py --sim SIM [SIM ...] --real REAL [REAL ...]
       validate_table.py SIM REAL [REAL ...]"""
import json
import os
import statistics
import sys


def load(path):
    with open(path) as f:
        j = json.load(f)
    runs = j if isinstance(j, list) else j.get("runs", [j])
    return {r["policy"]: r for r in runs}


def parse(argv):
    if "--sim" in argv and "--real" in argv:
        si, ri = argv.index("--sim"), argv.index("--real")
        sims = argv[si + 1:ri] if si < ri else argv[si + 1:]
        reals = argv[ri + 1:si] if ri < si else argv[ri + 1:]
        return sims, reals
    if len(argv) >= 2 and not argv[0].startswith("--"):
        return argv[:1], argv[1:]
    return [], []


def main():
    sim_paths, real_paths = parse(sys.argv[1:])
    if not sim_paths or not real_paths:
        sys.exit(__doc__)
    sims = [load(p) for p in sim_paths]
    reals = [load(p) for p in real_paths]
    paired = len(sims) == len(reals) and len(sims) > 1
    tol = float(os.environ.get("TOL", "0.25"))
    figures = [("p50 TTFT ms", "ttft_ms", "p50"), ("p99 TTFT ms", "ttft_ms", "p99"), ("mean TPOT ms", "tpot_ms", "mean")]
    n, m = len(reals), len(sims)
    head = f"| policy | figure | real (median of {n}) | real min-max | simulated (median of {m}) | simulated min-max | error |"
    print(head + (" paired errors |" if paired else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if paired else ""))
    worst, outside = 0.0, 0
    for policy in reals[0]:
        if any(policy not in r for r in reals) or any(policy not in s for s in sims):
            print(f"| {policy} | (missing in a report) | | | | | |")
            outside += 1
            continue
        for name, key, stat in figures:
            rv = [r[policy][key][stat] for r in reals]
            sv = [s[policy][key][stat] for s in sims]
            med, smed = statistics.median(rv), statistics.median(sv)
            err = (smed - med) / med if med > 0 else float("inf")
            worst = max(worst, abs(err))
            mark = "" if abs(err) <= tol else " (outside)"
            outside += abs(err) > tol
            row = (f"| {policy} | {name} | {med:.1f} | {min(rv):.1f}-{max(rv):.1f} | {smed:.1f} | {min(sv):.1f}-{max(sv):.1f} "
                   f"| {err * 100:+.0f} %{mark} |")
            if paired:
                row += " " + " / ".join(f"{(s - r) / r * 100:+.0f}" for s, r in zip(sv, rv)) + " % |"
            print(row)
    print(f"\nworst |error| {worst * 100:.0f} %; {outside} figure(s) outside {tol * 100:.0f} %")
    sys.exit(1 if outside else 0)


if __name__ == "__main__":
    main()
