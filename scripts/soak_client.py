#!/usr/bin/env python3
"""Soak client for scripts/soak.sh: a bursty open-loop trace against a running `kunserve serve`
(stdlib only). Bursts of long prompts overload the instances' KV (drops), calm phases let them
restore. Some requests are cancelled mid-stream (FIN) or disconnected abruptly (RST).

Every request gets exactly one outcome in the ledger: completed, rejected_429, cancelled (by us),
or failed (anything else: 5xx, other 4xx, an SSE error event, a stream cut by the server, a
connection error we did not cause). Prints one JSON object with the counts and the server's
/metrics figures at rest; soak.sh checks them.
"""
import argparse
import asyncio
import json
import random
import re
import sys
import time


class Ledger:
    def __init__(self):
        self.outcome = {}
        self.sent = 0
        self.details = {}
        self.cancelled_before_headers = 0  # the server may still answer these (e.g. with a 429)

    def record(self, rid, outcome, detail=""):
        if rid in self.outcome:
            raise RuntimeError(f"request {rid} got a second outcome {outcome} after {self.outcome[rid]}")
        self.outcome[rid] = outcome
        if outcome == "failed" and len(self.details) < 20:
            self.details[rid] = detail

    def counts(self):
        c = {"completed": 0, "rejected_429": 0, "cancelled": 0, "failed": 0}
        for o in self.outcome.values():
            c[o] += 1
        return c


async def read_headers(reader):
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before the status line")
    parts = status_line.decode("latin-1").split(" ", 2)
    status = int(parts[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


async def body_chunks(reader, headers):
    """Yields the body in pieces (chunked or Content-Length)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise ConnectionError("stream cut inside a chunked body")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        yield await reader.read()


async def http_get(host, port, path):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    status, headers = await read_headers(reader)
    body = b"".join([c async for c in body_chunks(reader, headers)])
    writer.close()
    return status, body.decode("utf-8", "replace")


def parse_metrics(text):
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([^\s{]+)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def metric_sum(metrics, name, label_filter=""):
    return sum(v for (n, labels), v in metrics.items() if n == name and label_filter in labels)


async def one_request(args, ledger, rid, rng, burst):
    chat = rng.random() < 0.5
    stream = rng.random() < 0.7
    r = rng.random()
    action = "cancel" if r < args.cancel_fraction else ("disconnect" if r < args.cancel_fraction + args.disconnect_fraction else "normal")
    words = rng.randint(args.burst_prompt_words // 2, args.burst_prompt_words) if burst else rng.randint(4, 40)
    text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "soak", "kun", "serve", "token"]) for _ in range(words))
    max_tokens = rng.randint(8, args.max_tokens)
    body = {"max_tokens": max_tokens, "stream": stream, "temperature": 0.0}
    if args.model:
        body["model"] = args.model
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = text
        path = "/v1/completions"
    data = json.dumps(body).encode()
    req = (f"POST {path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data
    ledger.sent += 1
    writer = None
    try:
        reader, writer = await asyncio.open_connection(args.host, args.port)
        writer.write(req)
        await writer.drain()
        if action == "disconnect" and not stream:
            # Abrupt reset while the server works on it.
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            writer.transport.abort()
            ledger.record(rid, "cancelled")
            ledger.cancelled_before_headers += 1
            return
        status, headers = await read_headers(reader)
        if status == 429:
            async for _ in body_chunks(reader, headers):
                pass
            ledger.record(rid, "rejected_429")
            return
        if status != 200:
            payload = b"".join([c async for c in body_chunks(reader, headers)])
            ledger.record(rid, "failed", f"HTTP {status}: {payload[:200]!r}")
            return
        if not stream:
            payload = b"".join([c async for c in body_chunks(reader, headers)])
            obj = json.loads(payload)
            if obj.get("choices"):
                ledger.record(rid, "completed")
            else:
                ledger.record(rid, "failed", f"200 without choices: {payload[:200]!r}")
            return
        cut_after = rng.randint(1, max(1, max_tokens // 2)) if action != "normal" else -1
        events = 0
        buf = b""
        async for piece in body_chunks(reader, headers):
            buf += piece
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                payload = event[6:]
                if payload == b"[DONE]":
                    ledger.record(rid, "completed")
                    return
                obj = json.loads(payload)
                if "error" in obj:
                    ledger.record(rid, "failed", f"SSE error event: {payload[:200]!r}")
                    return
                events += 1
                if events == cut_after:
                    if action == "cancel":
                        writer.close()  # FIN: the server's next write fails
                    else:
                        writer.transport.abort()  # RST
                    ledger.record(rid, "cancelled")
                    return
        ledger.record(rid, "failed", "stream ended without [DONE]")
    except (ConnectionError, asyncio.IncompleteReadError, OSError, ValueError) as e:
        if rid not in ledger.outcome:
            ledger.record(rid, "failed", f"{type(e).__name__}: {e}")
    finally:
        if writer is not None and not writer.transport.is_closing():
            writer.close()


async def main_async(args):
    rng = random.Random(args.seed)
    ledger = Ledger()
    tasks = set()
    start = time.monotonic()
    rid = 0
    inflight_cap = asyncio.Semaphore(args.max_inflight)

    async def run(i, burst):
        async with inflight_cap:
            await one_request(args, ledger, i, random.Random(args.seed * 1000003 + i), burst)

    phase_len = args.burst_seconds + args.calm_seconds
    while time.monotonic() - start < args.seconds:
        t = (time.monotonic() - start) % phase_len
        burst = t < args.burst_seconds
        rate = args.burst_rate if burst else args.calm_rate
        task = asyncio.create_task(run(rid, burst))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        rid += 1
        await asyncio.sleep(rng.expovariate(rate))
    if tasks:
        await asyncio.wait(tasks, timeout=args.drain_seconds)
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    missing = [i for i in range(rid) if i not in ledger.outcome]
    # Rest: wait for the engine to finish everything and free its KV.
    metrics = {}
    rest_deadline = time.monotonic() + args.rest_seconds
    while True:
        status, text = await http_get(args.host, args.port, "/metrics")
        metrics = parse_metrics(text)
        running = metric_sum(metrics, "vllm:num_requests_running") + metric_sum(metrics, "vllm:num_requests_waiting")
        free = metric_sum(metrics, "kunserve_kv_blocks_free")
        cap = metric_sum(metrics, "kunserve_kv_blocks_capacity")
        if (running == 0 and free == cap) or time.monotonic() > rest_deadline:
            break
        await asyncio.sleep(0.5)
    counts = ledger.counts()
    result = {
        "requests_sent": ledger.sent,
        "requests_issued": rid,
        **counts,
        "cancelled_before_headers": ledger.cancelled_before_headers,
        "outcomes_recorded": len(ledger.outcome),
        "missing_outcomes": len(missing),
        "hung_at_end": len(pending),
        "failed_examples": ledger.details,
        "server": {
            "http_429": metric_sum(metrics, "kunserve_http_responses_total", 'code="429"'),
            "http_5xx": sum(v for (n, l), v in metrics.items() if n == "kunserve_http_responses_total" and 'code="5' in l),
            "finished_stop_length": metric_sum(metrics, "vllm:request_success_total", 'finished_reason="stop"') +
                                    metric_sum(metrics, "vllm:request_success_total", 'finished_reason="length"'),
            "finished_abort": metric_sum(metrics, "vllm:request_success_total", 'finished_reason="abort"'),
            "finished_error": metric_sum(metrics, "vllm:request_success_total", 'finished_reason="error"'),
            "disconnect_cancels": metric_sum(metrics, "kunserve_http_client_disconnect_cancels_total"),
            "drops": metric_sum(metrics, "kunserve_drops_total"),
            "restores": metric_sum(metrics, "kunserve_restores_total"),
            "kv_blocks_free": metric_sum(metrics, "kunserve_kv_blocks_free"),
            "kv_blocks_capacity": metric_sum(metrics, "kunserve_kv_blocks_capacity"),
            "requests_running_or_waiting": metric_sum(metrics, "vllm:num_requests_running") +
                                           metric_sum(metrics, "vllm:num_requests_waiting"),
        },
    }
    print(json.dumps(result))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--burst-seconds", type=float, default=6)
    p.add_argument("--calm-seconds", type=float, default=9)
    p.add_argument("--burst-rate", type=float, default=20, help="requests/s during a burst")
    p.add_argument("--calm-rate", type=float, default=1.5, help="requests/s between bursts")
    p.add_argument("--burst-prompt-words", type=int, default=120)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--cancel-fraction", type=float, default=0.1)
    p.add_argument("--disconnect-fraction", type=float, default=0.1)
    p.add_argument("--max-inflight", type=int, default=256)
    p.add_argument("--drain-seconds", type=float, default=120)
    p.add_argument("--rest-seconds", type=float, default=60)
    args = p.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
