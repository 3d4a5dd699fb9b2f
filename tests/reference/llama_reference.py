#!/usr/bin/python3
"""Independent reference forward pass for Llama-family models (Llama 2/3, Qwen2, Mistral).

Reads a HuggingFace model directory (config.json + *.safetensors, optionally sharded with
model.safetensors.index.json) using only the standard library and numpy -- none of KunServe's
C++ code -- and runs the decoder in PyTorch in float32:

  embed -> L x [RMSNorm -> q/k/v (+bias) -> RoPE (rotate_half, rope scaling) -> causal GQA
  attention -> o_proj -> residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head
  (tied to the embedding when tie_word_embeddings).

RoPE tables are computed in float64 (inverse frequencies with linear / llama3 scaling, as in
transformers' _compute_llama3_parameters, and position * frequency) and rounded to float32
once; everything else is float32.

--kv-dtype bf16 models a bf16 KV cache (KunServe's default): each layer's K (after RoPE) and V
are rounded to bfloat16 (torch's float32 -> bfloat16 conversion, round to nearest even) and
widened back to float32 before attention reads them, for the new tokens as for the cached ones;
queries, scores and everything else stay float32. The default f32 keeps K/V exact.

Usage (Debian's python3 has numpy and torch):
  /usr/bin/python3 tests/reference/llama_reference.py --model DIR --tokens 1,2,3 [--generate N]
      [--logits-npy PATH] [--threads T] [--no-cache] [--inv-freq] [--check-cache]
      [--kv-dtype f32|bf16]
prints one JSON object:
  {"logits_last": [...vocab floats for the last prompt position...],
   "tokens": [...N greedy tokens...], "margins": [...top1 - top2 logit per generated step...]}
--logits-npy writes the prompt's logits for all positions, float32 [T, vocab].
"""

import argparse
import glob
import json
import math
import os
import struct
import sys

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------
# safetensors, parsed by hand

_NP_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
}


def read_safetensors(path):
    """Returns {name: float32 numpy array} for every tensor of one .safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: truncated (no header length)")
        (header_len,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(header_len).decode("utf-8"))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        buf = np.asarray(data[begin:end])
        dtype = entry["dtype"]
        if dtype == "BF16":
            bits = buf.view(np.uint16).astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif dtype in _NP_DTYPES:
            arr = buf.view(_NP_DTYPES[dtype]).astype(np.float32)
        else:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {dtype}")
        out[name] = arr.reshape(shape).copy()
    return out


def load_weights(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, x) for x in files]
    else:
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"{model_dir}: no safetensors files")
    weights = {}
    for path in files:
        weights.update(read_safetensors(path))
    return weights


# ----------------------------------------------------------------------------------------------
# config

class Config:
    def __init__(self, cfg):
        arch = (cfg.get("architectures") or [cfg.get("model_type", "llama")])[0]
        self.arch = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                     "MistralForCausalLM": "mistral"}.get(arch, arch)
        if self.arch not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"unsupported architecture {arch}")
        self.vocab = cfg["vocab_size"]
        self.hidden = cfg["hidden_size"]
        self.ffn = cfg["intermediate_size"]
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads") or self.heads
        self.head_dim = cfg.get("head_dim") or self.hidden // self.heads
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.theta = cfg.get("rope_theta", 10000.0)
        self.rope_scaling = cfg.get("rope_scaling")
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        self.bias = self.arch == "qwen2" or bool(cfg.get("attention_bias", False))

    def inv_freq(self):
        """head_dim/2 inverse frequencies (float64) with rope scaling applied."""
        d = self.head_dim
        inv = 1.0 / (self.theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        rs = self.rope_scaling
        if not rs:
            return inv
        kind = rs.get("rope_type", rs.get("type"))
        if kind in (None, "default"):
            return inv
        factor = float(rs["factor"])
        if kind == "linear":
            return inv / factor
        if kind == "llama3":
            low = float(rs.get("low_freq_factor", 1.0))
            high = float(rs.get("high_freq_factor", 4.0))
            old_ctx = float(rs.get("original_max_position_embeddings", 8192))
            low_wavelen = old_ctx / low
            high_wavelen = old_ctx / high
            out = np.empty_like(inv)
            for i, f in enumerate(inv):
                wavelen = 2.0 * math.pi / f
                if wavelen < high_wavelen:
                    out[i] = f
                elif wavelen > low_wavelen:
                    out[i] = f / factor
                else:
                    smooth = (old_ctx / wavelen - low) / (high - low)
                    out[i] = (1.0 - smooth) * f / factor + smooth * f
            return out
        raise ValueError(f"unsupported rope scaling {kind}")


# ----------------------------------------------------------------------------------------------
# model

class Model:
    def __init__(self, model_dir, kv_dtype="f32"):
        self.kv_dtype = kv_dtype
        with open(os.path.join(model_dir, "config.json")) as f:
            self.cfg = Config(json.load(f))
        w = load_weights(model_dir)
        t = lambda name: torch.from_numpy(w[name])
        c = self.cfg
        self.embed = t("model.embed_tokens.weight")
        self.norm = t("model.norm.weight")
        self.lm_head = self.embed if c.tied else t("lm_head.weight")
        self.layers = []
        for i in range(c.layers):
            p = f"model.layers.{i}."
            layer = {
                "in_norm": t(p + "input_layernorm.weight"),
                "q": t(p + "self_attn.q_proj.weight"),
                "k": t(p + "self_attn.k_proj.weight"),
                "v": t(p + "self_attn.v_proj.weight"),
                "o": t(p + "self_attn.o_proj.weight"),
                "post_norm": t(p + "post_attention_layernorm.weight"),
                "gate": t(p + "mlp.gate_proj.weight"),
                "up": t(p + "mlp.up_proj.weight"),
                "down": t(p + "mlp.down_proj.weight"),
            }
            if c.bias:
                for k in ("q", "k", "v"):
                    layer[k + "_bias"] = t(p + f"self_attn.{k}_proj.bias")
            self.layers.append(layer)
        self.inv_freq = c.inv_freq()

    def rope_tables(self, positions):
        ang = np.outer(np.asarray(positions, dtype=np.float64), self.inv_freq)  # [T, hd/2]
        ang = np.concatenate([ang, ang], axis=-1)
        return (torch.from_numpy(np.cos(ang).astype(np.float32)),
                torch.from_numpy(np.sin(ang).astype(np.float32)))

    def rms_norm(self, x, w):
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.cfg.eps))

    @staticmethod
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def forward(self, tokens, start_pos=0, cache=None):
        """Logits [T, vocab] for `tokens` at positions start_pos.. ; `cache` (list of (k, v) per
        layer, or None for a fresh prefill) is extended in place when given."""
        c = self.cfg
        T = len(tokens)
        x = self.embed[torch.tensor(tokens, dtype=torch.long)]
        cos, sin = self.rope_tables(range(start_pos, start_pos + T))
        cos = cos[:, None, :]
        sin = sin[:, None, :]
        n_rep = c.heads // c.kv_heads
        scale = 1.0 / math.sqrt(c.head_dim)
        for li, L in enumerate(self.layers):
            h = self.rms_norm(x, L["in_norm"])
            q = h @ L["q"].T
            k = h @ L["k"].T
            v = h @ L["v"].T
            if c.bias:
                q = q + L["q_bias"]
                k = k + L["k_bias"]
                v = v + L["v_bias"]
            q = q.view(T, c.heads, c.head_dim)
            k = k.view(T, c.kv_heads, c.head_dim)
            v = v.view(T, c.kv_heads, c.head_dim)
            q = q * cos + self.rotate_half(q) * sin
            k = k * cos + self.rotate_half(k) * sin
            if self.kv_dtype == "bf16":
                # What a bf16 KV cache holds: rounded once when appended, read back exactly.
                k = k.to(torch.bfloat16).to(torch.float32)
                v = v.to(torch.bfloat16).to(torch.float32)
            if cache is not None:
                if len(cache) <= li:
                    cache.append((k, v))
                else:
                    pk, pv = cache[li]
                    k = torch.cat([pk, k], dim=0)
                    v = torch.cat([pv, v], dim=0)
                    cache[li] = (k, v)
            S = k.shape[0]  # keys: positions 0 .. S-1
            k = k.repeat_interleave(n_rep, dim=1)  # head h uses kv head h // n_rep
            v = v.repeat_interleave(n_rep, dim=1)
            scores = torch.einsum("thd,shd->hts", q, k) * scale
            qpos = torch.arange(start_pos, start_pos + T)[:, None]
            kpos = torch.arange(S)[None, :]
            scores = scores.masked_fill((kpos > qpos)[None, :, :], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            attn = torch.einsum("hts,shd->thd", probs, v).reshape(T, c.heads * c.head_dim)
            x = x + attn @ L["o"].T
            h = self.rms_norm(x, L["post_norm"])
            gate = h @ L["gate"].T
            x = x + (torch.nn.functional.silu(gate) * (h @ L["up"].T)) @ L["down"].T
        x = self.rms_norm(x, self.norm)
        return x @ self.lm_head.T


def greedy(model, prompt, n, use_cache=True):
    """Greedy generation of n tokens; returns (prompt logits [T, V], tokens, margins)."""
    tokens = list(prompt)
    cache = [] if use_cache else None
    logits = model.forward(tokens, 0, cache)
    prompt_logits = logits
    out, margins = [], []
    last = logits[-1]
    for _ in range(n):
        top2 = torch.topk(last, 2)
        nxt = int(top2.indices[0])
        margins.append(float(top2.values[0] - top2.values[1]))
        out.append(nxt)
        tokens.append(nxt)
        if use_cache:
            last = model.forward([nxt], len(tokens) - 1, cache)[-1]
        else:
            last = model.forward(tokens, 0, None)[-1]
    return prompt_logits, out, margins


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory (config.json + safetensors)")
    ap.add_argument("--tokens", required=True, help="comma-separated prompt token ids")
    ap.add_argument("--generate", type=int, default=0, help="greedy tokens to generate")
    ap.add_argument("--logits-npy", help="write the prompt's logits [T, vocab] float32 here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    ap.add_argument("--inv-freq", action="store_true", help="also print the RoPE inverse frequencies")
    ap.add_argument("--check-cache", action="store_true",
                    help="also generate without the KV cache and report \"cache_consistent\"")
    ap.add_argument("--kv-dtype", choices=("f32", "bf16"), default="f32",
                    help="KV cache element type to model: K/V rounded to bf16 before attention (bf16)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    prompt = [int(x) for x in args.tokens.split(",") if x.strip()]
    if not prompt:
        ap.error("--tokens is empty")
    torch.set_grad_enabled(False)
    model = Model(args.model, args.kv_dtype)
    bad = [t for t in prompt if t < 0 or t >= model.cfg.vocab]
    if bad:
        ap.error(f"token ids out of range [0, {model.cfg.vocab}): {bad}")
    prompt_logits, toks, margins = greedy(model, prompt, args.generate, use_cache=not args.no_cache)
    if args.logits_npy:
        np.save(args.logits_npy, prompt_logits.numpy().astype(np.float32))
    result = {
        "logits_last": [float(v) for v in prompt_logits[-1].tolist()],
        "tokens": toks,
        "margins": margins,
    }
    if args.check_cache:
        _, toks2, _ = greedy(model, prompt, args.generate, use_cache=args.no_cache)
        result["cache_consistent"] = toks2 == toks
    if args.inv_freq:
        result["inv_freq"] = [float(v) for v in model.inv_freq]
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
