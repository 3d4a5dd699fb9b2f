#!/usr/bin/env python3
"""Fits the sim cost model's efficiency constants to ../shared/gpu-profiles (stdlib only).

Usage: python3 sim/calibration/fit_cost_model.py [/path/to/shared/gpu-profiles]
Prints the constants that sim/cost_model.cc ships and the fit error. The model (per decoder
layer, TP 1, bf16) must match sim/cost_model.cc:
  GEMM op   t = max(flops / (eff_flops * peak), bytes / (eff_bw * hbm)) + overhead_gemm
  elementwise op t = bytes / (eff_elem_bw * hbm) + overhead_elem
"""
import csv, itertools, math, os, statistics, sys

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), '../../../shared/gpu-profiles')
SPECS = {'a100': (312e12, 2.039e12), 'h100': (989e12, 3.35e12)}
MODELS = {'a100': ['meta-llama/Llama-2-7b-hf', 'meta-llama/Meta-Llama-3-8B'], 'h100': ['meta-llama/Llama-2-7b-hf']}
GEMM = ['attn_pre_proj', 'attn_post_proj', 'mlp_up_proj', 'mlp_down_proj']
ELEM = ['input_layernorm', 'attn_rope', 'post_attention_layernorm', 'mlp_act', 'add']


def shapes(r, t):
  h, nh, nkv, e = int(r['n_embd']), int(r['n_head']), int(r['n_kv_head']), int(r['n_expanded_embd'])
  hd = h // nh
  gated = r['use_gated_mlp'] == 'True'
  gemm = {'attn_pre_proj': (h, (nh + 2 * nkv) * hd), 'attn_post_proj': (nh * hd, h),
          'mlp_up_proj': (h, (2 if gated else 1) * e), 'mlp_down_proj': (e, h)}
  elem = {'input_layernorm': 2 * t * h * 2, 'post_attention_layernorm': 2 * t * h * 2,
          'attn_rope': 2 * t * (nh + nkv) * hd * 2, 'mlp_act': t * 3 * e * 2, 'add': 3 * t * h * 2}
  return gemm, elem


def load(gpu):
  out = []
  for m in MODELS[gpu]:
    for r in csv.DictReader(open(os.path.join(ROOT, 'compute', gpu, m, 'mlp.csv'))):
      if r['num_tensor_parallel_workers'] != '1':
        continue
      t = int(r['num_tokens'])
      gemm, elem = shapes(r, t)
      ops = []
      for op in GEMM:
        k, n = gemm[op]
        ops.append(('g', op, 2.0 * t * k * n, 2.0 * (k * n + t * k + t * n), float(r[f'time_stats.{op}.median']) * 1e3))
      for op in ELEM:
        ops.append(('e', op, 0.0, float(elem[op]), float(r[f'time_stats.{op}.median']) * 1e3))
      out.append((m, t, ops))
  return out


def pred(kind, flops, nbytes, p, peak, bw):
  ef, eb, og, ee, oe = p
  if kind == 'g':
    return max(flops / (ef * peak), nbytes / (eb * bw)) * 1e6 + og
  return nbytes / (ee * bw) * 1e6 + oe


def errors(rows, p, peak, bw, min_tokens, kinds):
  errs = []
  for _, t, ops in rows:
    if t < min_tokens:
      continue
    meas = sum(o[4] for o in ops if o[0] in kinds)
    pr = sum(pred(o[0], o[2], o[3], p, peak, bw) for o in ops if o[0] in kinds)
    errs.append(abs(pr - meas) / meas)
  return errs


def fit(gpu):
  peak, bw = SPECS[gpu]
  rows = load(gpu)
  # GEMM constants on GEMM ops, per-op relative error (log-space least squares), all token counts.
  def loss_g(p):
    s = 0.0
    for _, t, ops in rows:
      for o in ops:
        if o[0] == 'g':
          s += math.log(pred('g', o[2], o[3], p, peak, bw) / o[4]) ** 2
    return s
  def loss_e(p):
    s = 0.0
    for _, t, ops in rows:
      for o in ops:
        if o[0] == 'e':
          s += math.log(pred('e', o[2], o[3], p, peak, bw) / max(o[4], 0.5)) ** 2
    return s
  best = None
  for ef in [x / 100 for x in range(56, 90, 2)]:
    for eb in [x / 100 for x in range(60, 101, 2)]:
      for og in [float(x) for x in range(4, 30, 2)]:
        p = (ef, eb, og, 0.5, 2.0)
        l = loss_g(p)
        if best is None or l < best[0]:
          best = (l, p)
  ef, eb, og = best[1][:3]
  beste = None
  for ee in [x / 100 for x in range(20, 101, 2)]:
    for oe in [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]:
      p = (ef, eb, og, ee, oe)
      l = loss_e(p)
      if beste is None or l < beste[0]:
        beste = (l, p)
  p = beste[1]
  print(f'{gpu}: eff_flops={p[0]:.2f} eff_bw={p[1]:.2f} gemm_overhead_us={p[2]:.1f} '
        f'eff_elem_bw={p[3]:.2f} elem_overhead_us={p[4]:.1f}')
  for mt, label in [(64, '>=64 tokens'), (1, 'all tokens')]:
    e_all = errors(rows, p, peak, bw, mt, 'ge')
    e_g = errors(rows, p, peak, bw, mt, 'g')
    print(f'  layer total ({label}): median {statistics.median(e_all)*100:.1f}% max {max(e_all)*100:.1f}%;'
          f' GEMMs median {statistics.median(e_g)*100:.1f}% max {max(e_g)*100:.1f}%  (n={len(e_all)})')


def fit_link(path, dpn):
  pts = [(int(r['size']), float(r['time_stats.send_recv.median']) * 1e3)
         for r in csv.DictReader(open(path)) if r['devices_per_node'] == dpn]
  best = None
  for lat in [x * 0.5 for x in range(0, 61)]:
    for gbs in [x * 0.5 for x in range(2, 1001)]:
      errs = [abs(lat + s / (gbs * 1e3) - t) / t for s, t in pts]
      m = statistics.median(errs)
      if best is None or m < best[0]:
        best = (m, lat, gbs, max(errs))
  big = [abs(best[1] + s / (best[2] * 1e3) - t) / t for s, t in pts if s >= 1 << 20]
  print(f'  {os.path.basename(os.path.dirname(path))} devices_per_node={dpn}: latency {best[1]:.1f} us,'
        f' {best[2]:.1f} GB/s; median err {best[0]*100:.1f}% (>=1MiB: {statistics.median(big)*100:.1f}%), max {best[3]*100:.0f}%')


def fit_all_reduce(path, workers):
  # Intra-node all-reduce of `workers` GPUs (devices_per_node == num_workers): latency + size / bw,
  # chosen to minimise the median relative error over messages of 64 KiB and more (the sizes of
  # a step's hidden states: tokens x hidden x 2 bytes).
  pts = [(int(r['size']), float(r['time_stats.all_reduce.median']) * 1e3)
         for r in csv.DictReader(open(path))
         if r['num_workers'] == workers and r['devices_per_node'] == workers and int(r['size']) >= 1 << 16]
  best = None
  for lat in range(0, 121, 1):
    for gbs in range(20, 601, 2):
      errs = [abs(lat + s / (gbs * 1e3) - t) / t for s, t in pts]
      m = statistics.median(errs)
      if best is None or m < best[0]:
        best = (m, lat, gbs)
  print(f'  {os.path.basename(os.path.dirname(path))} all_reduce tp={workers}: latency {best[1]} us,'
        f' {best[2]} GB/s; median err {best[0]*100:.1f}% (n={len(pts)})')


if __name__ == '__main__':
  for g in ['a100', 'h100']:
    fit(g)
  print('links:')
  for setup in ['a100_pairwise_nvlink', 'a100_dgx', 'h100_dgx']:
    for dpn in ['2', '1']:
      fit_link(os.path.join(ROOT, 'network', setup, 'send_recv.csv'), dpn)
  print('all-reduce:')
  for setup in ['a100_dgx', 'h100_dgx']:
    for w in ['2', '4', '8']:
      fit_all_reduce(os.path.join(ROOT, 'network', setup, 'all_reduce.csv'), w)
