#!/usr/bin/env python3
"""Host contention measured inside a real run: reads the step logs that `kunserve bench
--in-process --out-dir DIR` writes (DIR/POLICY_steps.csv, every engine step: end, executor time,
tokens, sampled, attended pairs, swap blocks) and a device profile (sim/device_profile.h, its
step table measured by `kunserve calibrate` on one device alone), and fits the host's sharing of
its cores among the devices as the simulator models it (sim/cost_model.h, GpuSpec::
host_contention and host_contention_us): a step taken while k devices compute lasts
a(k) x table + b(k). k of a step is the time-weighted number of steps in flight over its span
(its own included; a fused group of g devices keeps g micro-batches in flight, each spanning
about a round: each counts one device; a step's swap copies wait on the paced host link and
compute nothing: with --swap-us-per-block the step counts only for the rest of its span), rounded. Per k, least squares on the independent instances' steps without swap
copies, unweighted (the simulator must get the mean right: the total time the devices spend);
a(k) alone (b = 0) when the fit gives b < 0 or a < 0.5. Writes the profile with the fitted curves
(the step table unchanged) and prints, per k, the steps, the measured mean time over the table's,
and the fit.
With --bench-json REAL.json --host-link-gbps G (the run's report and its --host-link-gbps) the
swap copy time per layer block is the report's swap bytes over the logs' swap blocks, at G.
Usage: fit_host_contention.py [--swap-us-per-block US | --bench-json REAL.json --host-link-gbps G]
                              PROFILE OUT_PROFILE STEPS.csv [STEPS.csv ...]"""
import csv
import json
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


def predicted_us(spec, r):
    """sim::CostModel::step_us for one stage holding every layer (the profile's table)."""
    return (spec["step_overhead_us"] + table_us(spec, r["new_tokens"]) + spec["sample_us"] * max(0, r["sampled"] - 1)
            + spec["attn_pair_us"] * r["attended_pairs"])


def busy_devices(spans):
    """For each span (start, end, weight), the time-weighted sum of weights in flight over it."""
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    out = [0.0] * len(spans)
    active = []  # indices whose span may still overlap
    for i in order:
        s, e, w = spans[i]
        active = [j for j in active if spans[j][1] > s]
        for j in active:
            s2, e2, w2 = spans[j]
            ov = min(e, e2) - max(s, s2)
            if ov > 0:
                out[i] += w2 * ov
                out[j] += w * ov
        active.append(i)
    return [w + (out[i] / (e - s) if e > s else 0.0) for i, (s, e, w) in enumerate(spans)]


def main():
    args = sys.argv[1:]
    swap_us, bench_json, gbps = 0.0, None, 0.0
    while args and args[0].startswith("--"):
        if len(args) < 2:
            sys.exit(__doc__)
        if args[0] == "--swap-us-per-block":
            swap_us = float(args[1])
        elif args[0] == "--bench-json":
            bench_json = args[1]
        elif args[0] == "--host-link-gbps":
            gbps = float(args[1])
        else:
            sys.exit(__doc__)
        args = args[2:]
    if len(args) < 3:
        sys.exit(__doc__)
    if bench_json and gbps > 0:
        with open(bench_json) as f:
            j = json.load(f)
        runs = j if isinstance(j, list) else [j]
        swap_bytes = sum(r.get("runtime", {}).get("transfer_bytes", {}).get(k, 0) for r in runs for k in ("swap_in", "swap_out"))
        blocks = 0
        for path in args[2:]:
            with open(path) as f:
                blocks += sum(int(r["swap_blocks"]) for r in csv.DictReader(f))
        if blocks > 0:
            swap_us = swap_bytes / blocks / (gbps * 1e9) * 1e6
    sys.argv = [sys.argv[0]] + args
    with open(sys.argv[1]) as f:
        prof = json.load(f)
    spec = prof["spec"]
    max_k = max(4, len(spec.get("host_contention", [])))
    samples = {k: [] for k in range(1, max_k + 1)}
    for path in sys.argv[3:]:
        with open(path) as f:
            rows = [{k: int(v) for k, v in r.items()} for r in csv.DictReader(f)]
        spans = []
        for r in rows:
            d = r["duration_us"]
            copy = min(d, swap_us * r["swap_blocks"])
            spans.append((r["end_us"] - d, r["end_us"], 1.0 - copy / d if d > 0 else 1.0))
        busy = busy_devices(spans)
        for r, k in zip(rows, busy):
            if r["unit_devices"] != 1 or r["swap_blocks"] > 0 or r["sequences"] == 0:
                continue
            samples[min(max_k, max(1, round(k)))].append((predicted_us(spec, r), float(r["duration_us"])))
    a_of, b_of = [], []
    print("| devices computing | steps | mean measured / table | fitted a | fitted b us | a 1-token step, x table |")
    print("|---|---|---|---|---|---|")
    for k in range(1, max_k + 1):
        v = samples[k]
        n = len(v)
        sx = sum(x for x, _ in v)
        sy = sum(y for _, y in v)
        a, b = (sy / sx if sx > 0 else float("nan")), 0.0
        if n >= 20:
            sxx = sum(x * x for x, _ in v)
            sxy = sum(x * y for x, y in v)
            det = n * sxx - sx * sx
            if det > 1e-9 * n * sxx:
                fa = (n * sxy - sx * sy) / det
                fb = (sy - fa * sx) / n
                if fb >= 0 and fa >= 0.5:
                    a, b = fa, fb
        if n < 20:  # too few steps at this count: between the neighbours (filled below)
            a, b = float("nan"), float("nan")
        a_of.append(a)
        b_of.append(b)
        one = table_us(spec, 1)
        ratio = f"{sy / sx:.2f}" if sx > 0 else "-"
        print(f"| {k} | {n} | {ratio} | {a:.2f} | {b:.0f} | {(a * one + b) / one:.2f} |")
    # Counts with too few steps: the previous count's values (1: no contention).
    for k in range(max_k):
        if a_of[k] != a_of[k]:
            a_of[k], b_of[k] = (a_of[k - 1], b_of[k - 1]) if k > 0 else (1.0, 0.0)
    spec["host_contention"] = a_of
    spec["host_contention_us"] = b_of
    prof["contention"] = a_of
    prof["contention_source"] = "fitted to the step logs " + " ".join(sys.argv[3:])
    with open(sys.argv[2], "w") as f:
        json.dump(prof, f, indent=1)


if __name__ == "__main__":
    main()
