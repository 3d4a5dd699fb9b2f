#!/usr/bin/env python3
"""kunserve's engine against llama.cpp on the same GGUF file, as a user comparing engines would.

Both engines load one GGUF file (by default `kunserve gen-model --preset llama-350m --format gguf
--dtype bf16`) and are timed the same way with the same thread count: decode tokens/s at each
batch (that many sequences with 32-token prompts, then --steps decode steps of one token per
sequence, the first step untimed) and the prefill of a 512-token prompt. kunserve runs in
bench/model/model_bench (`--model FILE --json`: the real engine, SingleInstance); llama.cpp in
tests/llamacpp/llamacpp_bench.mjs (npm's node-llama-cpp with its prebuilt CPU build). The two
alternate, the order swapped every repetition, so both see the same host; each figure is the
median of --reps repetitions with its range, and the speed ratio is taken per repetition.

--serving N adds a serving burst: N streamed requests with 128-token prompts (token ids), 64
greedy tokens each (EOS ignored), all sent at once, timed from the client
(tests/llamacpp/serving_bench.mjs): against a live `kunserve serve --model FILE --devices 1`
over its OpenAI API, and against llama.cpp with one sequence per request in one context (no
HTTP in front of it). Time to first token (median, p90) and generated tokens/s.

usage: scripts/compare_llamacpp.py [--model FILE.gguf] [--preset NAME] [--threads T] [--reps R]
                                   [--steps S] [--batches B ...] [--no-prefill] [--out DIR]
                                   [--build DIR] [--serving N]
Needs the release build (model_bench, kunserve; --build, default build/release) and
scripts/install_deps.sh's tests/llamacpp. Where llama.cpp's npm build is not installed: exit
status 77 (ctest's skip), or 1 under CI=true.
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def last_json(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith('{'):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_json(cmd, cwd=None, env=None):
    p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = last_json(p.stdout)
    if p.returncode != 0 or result is None:
        sys.stderr.write(p.stdout[-4000:])
        sys.exit(f'compare_llamacpp: {" ".join(cmd)} failed (exit {p.returncode})')
    return result


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def serve_and_measure(kunserve, model, threads, requests, client_cmd, cwd, env):
    """client_cmd ends with the client's own options; the URL and model name go in front of them."""
    """Starts `kunserve serve` on the file, runs the client against it, stops the server."""
    port = free_port()
    kv_tokens = requests * (128 + 64 + 32)
    server = subprocess.Popen([kunserve, 'serve', '--model', model, '--devices', '1', '--threads', str(threads),
                               '--max-num-seqs', str(requests), '--kv-tokens-per-device', str(kv_tokens),
                               '--max-batched-tokens', '512', '--served-model-name', 'm', '--port', str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                sys.exit(f'compare_llamacpp: kunserve serve did not come up: {server.stderr.read()[-2000:]}')
            time.sleep(0.25)
        return run_json(client_cmd[:3] + [f'http://127.0.0.1:{port}', 'm'] + client_cmd[3:], cwd=cwd, env=env)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def summary(values):
    return statistics.median(values), min(values), max(values)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--model', help='GGUF file (default: gen-model --preset PRESET --dtype bf16 into --out)')
    ap.add_argument('--preset', default='llama-350m', help='preset of the generated file (default llama-350m)')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--batches', type=int, nargs='+', default=[1, 8, 32])
    ap.add_argument('--no-prefill', action='store_true')
    ap.add_argument('--out', default=os.path.join(ROOT, 'out', 'compare_llamacpp'))
    ap.add_argument('--build', default=os.path.join(ROOT, 'build', 'release'), help='build tree (default build/release)')
    ap.add_argument('--serving', type=int, default=0, metavar='N',
                    help='also time a burst of N streamed requests: kunserve serve against llama.cpp (0: off)')
    args = ap.parse_args()
    if args.reps < 1 or args.steps < 1 or args.threads < 1 or any(b < 1 for b in args.batches):
        ap.error('--reps, --steps, --threads and every batch must be at least 1')

    build = args.build
    model_bench = os.path.join(build, 'bench', 'model', 'model_bench')
    kunserve = os.path.join(build, 'bin', 'kunserve')
    for exe in (model_bench, kunserve):
        if not os.access(exe, os.X_OK):
            sys.exit(f'compare_llamacpp: {exe} is missing: cmake --preset release && cmake --build --preset release')
    llamacpp_dir = os.path.join(ROOT, 'tests', 'llamacpp')
    if not os.path.isdir(os.path.join(llamacpp_dir, 'node_modules', 'node-llama-cpp')):
        print('compare_llamacpp: llama.cpp is not installed (tests/llamacpp/node_modules): run scripts/install_deps.sh',
              file=sys.stderr)
        sys.exit(1 if os.environ.get('CI') == 'true' else 77)

    os.makedirs(args.out, exist_ok=True)
    model = args.model
    if model is None:
        model = os.path.join(args.out, f'{args.preset}-bf16.gguf')
        if not os.path.exists(model):
            subprocess.run([kunserve, 'gen-model', '--preset', args.preset, '--format', 'gguf', '--dtype', 'bf16',
                            '--out', model], check=True, stdout=subprocess.DEVNULL)
    model = os.path.abspath(model)

    batches = [str(b) for b in args.batches]
    prefill = 'false' if args.no_prefill else 'true'
    ours_cmd = [model_bench, '--model', model, '--threads', str(args.threads), '--reps', '1', '--steps',
                str(args.steps), '--batches', *batches, '--prefill', prefill, '--json']
    theirs_cmd = ['node', 'llamacpp_bench.mjs', model, '--threads', str(args.threads), '--steps', str(args.steps),
                  '--batches', *batches, '--prefill', prefill]
    # node-llama-cpp runs each evaluation on a libuv pool thread; with the default pool of 4,
    # consecutive steps land on different threads and llama.cpp's 2 compute threads contend with
    # the others on 2 cores (71 % of its samples in ggml_barrier on the tiny preset). One pool
    # thread: 1.0-1.4x faster decode on llama-350m (batch 8 1.1x), 1.6-2.6x on the tiny preset, so
    # llama.cpp is timed that way.
    node_env = dict(os.environ, UV_THREADPOOL_SIZE='1')
    runs = []
    token_range = None
    for rep in range(args.reps):
        order = ('ours', 'theirs') if rep % 2 == 0 else ('theirs', 'ours')
        got = {}
        for who in order:
            got[who] = run_json(ours_cmd) if who == 'ours' else run_json(theirs_cmd, cwd=llamacpp_dir, env=node_env)
            if who == 'ours':
                token_range = min(30000, got['ours']['vocab_size'] - 3)  # rep 0 runs kunserve first
            if args.serving > 0:
                client_opts = ['--requests', str(args.serving), '--token-range', str(token_range)]
                if who == 'ours':
                    got['ours_serving'] = serve_and_measure(
                        kunserve, model, args.threads, args.serving,
                        ['node', 'serving_bench.mjs', 'kunserve'] + client_opts, llamacpp_dir, node_env)
                else:
                    got['theirs_serving'] = run_json(['node', 'serving_bench.mjs', 'llamacpp', model, '--threads',
                                                      str(args.threads)] + client_opts, cwd=llamacpp_dir, env=node_env)
        runs.append(got)
        print(f'repetition {rep + 1}/{args.reps} done', file=sys.stderr)

    rows = []
    metrics = [(f'decode batch {b}', lambda r, b=b: r['ours']['decode'][b]['tokens_per_s'],
                lambda r, b=b: r['theirs']['decode'][b], lambda r, b=b: r['ours']['decode'][b]['ratio'])
               for b in batches]
    if prefill == 'true':
        metrics.append(('prefill 512 tokens', lambda r: r['ours']['prefill_512']['tokens_per_s'],
                        lambda r: r['theirs']['prefill_512'], lambda r: r['ours']['prefill_512']['ratio']))
    print(f'{model}, {args.threads} threads, {args.reps} repetitions (median [min .. max]), '
          f'{args.steps} timed decode steps per batch')
    print(f'{"":20} {"kunserve tokens/s":>26} {"llama.cpp tokens/s":>26} {"kunserve / llama.cpp":>24} '
          f'{"kunserve x limit":>17}')
    for name, ours, theirs, limit_ratio in metrics:
        o = [ours(r) for r in runs]
        t = [theirs(r) for r in runs]
        ratio = [a / b for a, b in zip(o, t)]
        om, t_m, rm = summary(o), summary(t), summary(ratio)
        print(f'{name:20} {om[0]:9.1f} [{om[1]:.1f} .. {om[2]:.1f}] {t_m[0]:9.1f} [{t_m[1]:.1f} .. {t_m[2]:.1f}] '
              f'{rm[0]:7.2f}x [{rm[1]:.2f} .. {rm[2]:.2f}] {statistics.median(limit_ratio(r) for r in runs):17.2f}')
        rows.append({'metric': name, 'kunserve_tokens_per_s': o, 'llamacpp_tokens_per_s': t, 'speed_ratio': ratio})
    print('kunserve x limit: the engine against the limit model_bench measures in the same run '
          '(read bandwidth for decode, compute peak for prefill)')
    if args.serving > 0:
        print(f'\nserving {args.serving} streamed requests at once (128-token prompts, 64 greedy tokens each), '
              'timed from the client; kunserve through `serve` and HTTP, llama.cpp in process')
        print(f'{"":20} {"kunserve":>26} {"llama.cpp":>26} {"kunserve / llama.cpp":>24}')
        for name, key, better in (('TTFT median ms', lambda j: j['ttft_ms']['median'], 'lower'),
                                  ('TTFT p90 ms', lambda j: j['ttft_ms']['p90'], 'lower'),
                                  ('tokens/s', lambda j: j['tokens_per_s'], 'higher')):
            o = [key(r['ours_serving']) for r in runs]
            t = [key(r['theirs_serving']) for r in runs]
            ratio = [a / b for a, b in zip(o, t)]
            om, t_m, rm = summary(o), summary(t), summary(ratio)
            print(f'{name:20} {om[0]:9.1f} [{om[1]:.1f} .. {om[2]:.1f}] {t_m[0]:9.1f} [{t_m[1]:.1f} .. {t_m[2]:.1f}] '
                  f'{rm[0]:7.2f}x [{rm[1]:.2f} .. {rm[2]:.2f}] ({better} is better)')
            rows.append({'metric': 'serving ' + name, 'kunserve': o, 'llamacpp': t, 'ratio': ratio})
    with open(os.path.join(args.out, 'result.json'), 'w') as f:
        json.dump({'model': model, 'threads': args.threads, 'steps': args.steps, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
    main()
