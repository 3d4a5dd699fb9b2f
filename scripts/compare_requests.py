#!/usr/bin/env python3
"""Request by request: a real run (`bench --in-process --out-dir DIR`: DIR/POLICY_requests.csv)
against its simulation (`simulate --timeline-prefix P`: P + POLICY_requests.csv), the same trace.
Prints, per policy and per window of arrival time, the median TTFT, queue wait (arrival to first
scheduled) and prefill-to-first-token time of both, and the requests whose TTFT differ most.
Usage: compare_requests.py --real DIR --sim PREFIX [--policies a,b] [--window-s 2]"""
import argparse
import csv
import statistics


def load(path):
    rows = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            if r["outcome"] != "ok" or int(r["first_token_us"]) < 0:
                continue
            rows[int(r["index"])] = {k: int(v) for k, v in r.items() if k != "outcome"}
    return rows


def med(v):
    return statistics.median(v) if v else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", required=True)
    ap.add_argument("--sim", required=True)
    ap.add_argument("--policies", default="recompute,swap,migrate,kunserve")
    ap.add_argument("--window-s", type=float, default=2.0)
    ap.add_argument("--worst", type=int, default=0)
    a = ap.parse_args()
    for p in a.policies.split(","):
        real = load(f"{a.real}/{p}_requests.csv")
        sim = load(f"{a.sim}{p}_requests.csv")
        both = sorted(set(real) & set(sim))
        print(f"## {p}: {len(both)} requests in both")
        print("| arrival s | n | TTFT real / sim ms | queue real / sim ms | first token after scheduled real / sim ms | arrival lag ms |")
        print("|---|---|---|---|---|---|")
        win = int(a.window_s * 1e6)
        by = {}
        for i in both:
            by.setdefault(sim[i]["arrival_us"] // win, []).append(i)
        for w in sorted(by):
            ids = by[w]
            f = lambda d, k: [d[i][k] / 1e3 for i in ids]
            ttft_r = [(real[i]["first_token_us"] - real[i]["arrival_us"]) / 1e3 for i in ids]
            ttft_s = [(sim[i]["first_token_us"] - sim[i]["arrival_us"]) / 1e3 for i in ids]
            pre_r = [(real[i]["first_token_us"] - real[i]["arrival_us"] - real[i]["queue_us"]) / 1e3 for i in ids]
            pre_s = [(sim[i]["first_token_us"] - sim[i]["arrival_us"] - sim[i]["queue_us"]) / 1e3 for i in ids]
            lag = [(real[i]["arrival_us"] - sim[i]["arrival_us"]) / 1e3 for i in ids]
            print(f"| {w * a.window_s:.0f}-{(w + 1) * a.window_s:.0f} | {len(ids)} | {med(ttft_r):.1f} / {med(ttft_s):.1f} "
                  f"| {med(f(real, 'queue_us')):.1f} / {med(f(sim, 'queue_us')):.1f} | {med(pre_r):.1f} / {med(pre_s):.1f} | {med(lag):.1f} |")
        rr = [real[i]["recomputed_tokens"] for i in both]
        ss = [sim[i]["recomputed_tokens"] for i in both]
        print(f"recomputed tokens real / sim: {sum(rr)} / {sum(ss)}")
        if a.worst:
            d = sorted(both, key=lambda i: -abs((real[i]["first_token_us"] - real[i]["arrival_us"]) -
                                                 (sim[i]["first_token_us"] - sim[i]["arrival_us"])))
            for i in d[: a.worst]:
                print(f"  #{i}: arrival {sim[i]['arrival_us'] / 1e6:.3f} s, prompt {sim[i]['prompt_tokens']}, TTFT real "
                      f"{(real[i]['first_token_us'] - real[i]['arrival_us']) / 1e3:.1f} sim {(sim[i]['first_token_us'] - sim[i]['arrival_us']) / 1e3:.1f} ms")
        print()


if __name__ == "__main__":
    main()
