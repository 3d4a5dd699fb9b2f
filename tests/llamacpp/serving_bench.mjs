// Serving a burst of streamed requests, timed from the client's side: N requests with the same
// P-token prompts (token ids), each generating T tokens greedily (EOS ignored), all sent at
// once. Prints one JSON object: time to first token per request (median, p90, max, ms), the
// makespan and the generated tokens per second over it.
//   node serving_bench.mjs kunserve URL MODEL_NAME [opts]   kunserve's OpenAI API (/v1/completions, stream)
//   node serving_bench.mjs llamacpp FILE.gguf [opts]         llama.cpp in this process, one sequence per request
// opts: --requests N (32) --prompt-len P (128) --max-tokens T (64) --threads C (2, llama.cpp)
//       --token-range R (30000: prompt ids 3 + (i * 97 + t * 13) % R, so R + 3 <= the vocabulary)
import { getLlama, LlamaLogLevel } from 'node-llama-cpp';

const [mode, target, third, ...rest] = process.argv.slice(2);
const opts = { requests: 32, 'prompt-len': 128, 'max-tokens': 64, threads: 2, 'token-range': 30000 };
const optArgs = mode === 'kunserve' ? rest : [third, ...rest].filter((a) => a !== undefined);
for (let i = 0; i < optArgs.length; i += 2) {
  const key = optArgs[i].replace(/^--/, '');
  if (!(key in opts)) {
    console.error(`unknown option ${optArgs[i]}`);
    process.exit(2);
  }
  opts[key] = Number(optArgs[i + 1]);
}
if (!['kunserve', 'llamacpp'].includes(mode) || !target) {
  console.error('usage: node serving_bench.mjs kunserve URL MODEL_NAME [opts] | llamacpp FILE.gguf [opts]');
  process.exit(2);
}
const N = opts.requests;
const P = opts['prompt-len'];
const T = opts['max-tokens'];
// The prompts of model_bench's decode: 3 + (i * 97 + t * 13) % R.
const R = opts['token-range'];
const prompt = (i) => Array.from({ length: P }, (_, t) => 3 + ((i * 97 + t * 13) % R));

function report(t0, firsts, ends, tokens) {
  const ttft = firsts.map((f) => f - t0).sort((a, b) => a - b);
  const at = (q) => ttft[Math.min(ttft.length - 1, Math.floor(q * ttft.length))];
  const makespan = (Math.max(...ends) - t0) / 1000;
  console.log(JSON.stringify({
    requests: N, prompt_len: P, max_tokens: T, generated_tokens: tokens,
    ttft_ms: { median: at(0.5), p90: at(0.9), max: ttft[ttft.length - 1] },
    makespan_s: makespan, tokens_per_s: tokens / makespan,
  }));
}

if (mode === 'kunserve') {
  const url = `${target.replace(/\/$/, '')}/v1/completions`;
  const model = third;
  const firsts = [], ends = [];
  let tokens = 0;
  const one = async (i) => {
    const res = await fetch(url, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model, prompt: prompt(i), max_tokens: T, temperature: 0, ignore_eos: true, stream: true,
                             stream_options: { include_usage: true } }),
    });
    if (!res.ok) throw new Error(`request ${i}: HTTP ${res.status}: ${await res.text()}`);
    const decoder = new TextDecoder();
    let buf = '', first = null;
    for await (const chunk of res.body) {
      buf += decoder.decode(chunk, { stream: true });
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line.startsWith('data:') || line === 'data: [DONE]') continue;
        const ev = JSON.parse(line.slice(5));
        if (first === null && ev.choices?.length) first = performance.now();
        if (ev.usage) tokens += ev.usage.completion_tokens;
      }
    }
    firsts[i] = first;
    ends[i] = performance.now();
  };
  const t0 = performance.now();
  await Promise.all(Array.from({ length: N }, (_, i) => one(i)));
  report(t0, firsts, ends, tokens);
} else {
  const llama = await getLlama({ gpu: false, build: 'never', logLevel: LlamaLogLevel.error, maxThreads: 0 });
  const model = await llama.loadModel({ modelPath: target });
  const context = await model.createContext({ contextSize: N * (P + T + 8), sequences: N, batchSize: 512,
                                              threads: opts.threads });
  const sequences = Array.from({ length: N }, () => context.getSequence());
  // Warm-up (not timed): one short evaluation, then a clean cache.
  await sequences[0].evaluateWithoutGeneratingNewTokens(prompt(999).slice(0, 16));
  await sequences[0].clearHistory();
  const firsts = [], ends = [];
  let tokens = 0;
  const one = async (i) => {
    let n = 0;
    for await (const token of sequences[i].evaluate(prompt(i), { temperature: 0 })) {
      if (n === 0) firsts[i] = performance.now();
      void token;
      if (++n >= T) break;
    }
    tokens += n;
    ends[i] = performance.now();
  };
  const t0 = performance.now();
  await Promise.all(Array.from({ length: N }, (_, i) => one(i)));
  report(t0, firsts, ends, tokens);
  await context.dispose();
  await model.dispose();
  await llama.dispose();
}
