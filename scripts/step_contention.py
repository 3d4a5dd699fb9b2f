#!/usr/bin/env python3
"""The real runtime's step times against the simulator's cost model: reads a bench step log
(`kunserve bench --in-process --out-dir DIR` writes DIR/POLICY_steps.csv) and a device profile
(sim/device_profile.h), predicts each independent instance's step uncontended from the profile's
table (as sim::CostModel::step_us does), and prints, by the number of devices computing while the
step ran (time-weighted over its span, from the other steps' spans; swap copies excluded), the
median ratio measured / predicted: the host contention the bench saw, beside the profile's.
Usage: step_contention.py PROFILE STEPS.csv [STEPS.csv ...]"""
import bisect
import csv
import json
import statistics
import sys


def table_us(spec, tokens):
    xs, ys = spec["table_tokens"], spec["table_us"]
    if tokens <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if tokens <= xs[i]:
            f = (tokens - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + f * (ys[i] - ys[i - 1])
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return ys[-1] + slope * (tokens - xs[-1])


def predicted_us(spec, row):
    tokens, sampled, pairs = row["new_tokens"], row["sampled"], row["attended_pairs"]
    return (spec["step_overhead_us"] + table_us(spec, tokens) + spec["sample_us"] * max(0, sampled - 1)
            + spec["attn_pair_us"] * pairs)


def busy_devices(spans, i):
    """Devices computing, time-weighted over span i (its own included)."""
    s, e, dev, _ = spans[i]
    if e <= s:
        return float(dev)
    total = 0.0
    for j, (s2, e2, dev2, _) in enumerate(spans):
        if j == i or e2 <= s or s2 >= e:
            continue
        total += dev2 * (min(e, e2) - max(s, s2))
    return dev + total / (e - s)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        prof = json.load(f)
    spec = prof["spec"]
    block_bytes = None
    for path in sys.argv[2:]:
        rows = []
        with open(path) as f:
            for r in csv.DictReader(f):
                rows.append({k: int(v) for k, v in r.items()})
        # A unit's step: one span per completion. Fused rounds overlap on a unit; counted by their
        # devices only through independent steps here (the ratio is reported for those).
        spans = [(r["end_us"] - r["duration_us"], r["end_us"], 1 if r["unit_devices"] == 1 else r["unit_devices"] / 2.0,
                  r) for r in rows]
        spans.sort(key=lambda x: x[0])
        by_k = {}
        for i, (s, e, dev, r) in enumerate(spans):
            if r["unit_devices"] != 1 or r["swap_blocks"] > 0 or r["sequences"] == 0:
                continue
            k = busy_devices(spans, i)
            by_k.setdefault(min(4, max(1, round(k))), []).append(r["duration_us"] / predicted_us(spec, r))
        print(f"{path}: {len(rows)} steps")
        print("| devices computing | steps | measured / profile table (median) | p25-p75 | profile's contention |")
        print("|---|---|---|---|---|")
        hc = spec.get("host_contention", [])
        for k in sorted(by_k):
            v = sorted(by_k[k])
            q = lambda p: v[min(len(v) - 1, int(p * len(v)))]
            c = hc[k - 1] if k - 1 < len(hc) else float("nan")
            print(f"| {k} | {len(v)} | {statistics.median(v):.2f} | {q(0.25):.2f}-{q(0.75):.2f} | {c:.2f} |")


if __name__ == "__main__":
    main()
