// llama.cpp (node-llama-cpp's prebuilt CPU build) timed on a GGUF file the way bench/model/
// model_bench times kunserve's engine: decode tokens/s at batch B (B sequences with 32-token
// prompts, then `steps` decode steps of one token per sequence, timed) and the prefill of a
// 512-token prompt (one evaluation, timed). Prints one JSON object
// {"decode": {"B": tokens_per_s, ...}, "prefill_512": tokens_per_s}.
// usage: node llamacpp_bench.mjs FILE.gguf [--threads T] [--steps S] [--batches B ...] [--prefill true|false]
import { getLlama, LlamaLogLevel } from 'node-llama-cpp';

const args = process.argv.slice(2);
const file = args[0];
let threads = 2;
let steps = 20;
let batches = [1, 8, 32];
let prefill = true;
for (let i = 1; i < args.length; i++) {
  if (args[i] === '--threads') threads = Number(args[++i]);
  else if (args[i] === '--steps') steps = Number(args[++i]);
  else if (args[i] === '--prefill') prefill = args[++i] !== 'false';
  else if (args[i] === '--batches') {
    batches = [];
    while (i + 1 < args.length && !args[i + 1].startsWith('--')) batches.push(Number(args[++i]));
  } else {
    console.error(`unknown argument ${args[i]}`);
    process.exit(2);
  }
}
if (!file) {
  console.error('usage: node llamacpp_bench.mjs FILE.gguf [--threads T] [--steps S] [--batches B ...] [--prefill true|false]');
  process.exit(2);
}
// maxThreads 0: a context's `threads` is the number it runs with (not a hint capped elsewhere).
const llama = await getLlama({ gpu: false, build: 'never', logLevel: LlamaLogLevel.error, maxThreads: 0 });
const model = await llama.loadModel({ modelPath: file });
const metadata = model.fileInfo.metadata;
const vocab = metadata[metadata.general.architecture]?.vocab_size ?? metadata.tokenizer.ggml.tokens.length;
// The same prompt tokens as model_bench: 3 + (i * 97 + t * 13) % 30000, within the vocabulary.
const promptOf = (i, n, stride) => Array.from({ length: n }, (_, t) => 3 + ((i * 97 + t * stride) % Math.min(30000, vocab - 3)));
const result = { decode: {}, prefill_512: null, threads, steps };

for (const batch of batches) {
  const context = await model.createContext({
    contextSize: batch * 128,
    sequences: batch,
    batchSize: Math.max(512, batch * 32),
    threads,
  });
  const sequences = Array.from({ length: batch }, () => context.getSequence());
  // The prompts but their last token, all sequences in one batch.
  await Promise.all(sequences.map((s, i) => s.evaluateWithoutGeneratingNewTokens(promptOf(i, 31, 13))));
  // First decode step (the last prompt token of every sequence): warm, not timed, as model_bench.
  const generators = sequences.map((s, i) => s.evaluate([promptOf(i, 32, 13)[31]], { temperature: 0 })[Symbol.asyncIterator]());
  await Promise.all(generators.map((g) => g.next()));
  const t0 = performance.now();
  for (let step = 0; step < steps; step++) await Promise.all(generators.map((g) => g.next()));
  const seconds = (performance.now() - t0) / 1000;
  await Promise.all(generators.map((g) => g.return()));
  result.decode[batch] = (batch * steps) / seconds;
  await context.dispose();
}

if (prefill) {
  const context = await model.createContext({ contextSize: 1024, sequences: 1, batchSize: 512, threads });
  const sequence = context.getSequence();
  await sequence.evaluateWithoutGeneratingNewTokens(promptOf(1, 16, 31));  // warm-up
  await sequence.clearHistory();
  const t0 = performance.now();
  await sequence.evaluateWithoutGeneratingNewTokens(promptOf(0, 512, 31));
  result.prefill_512 = 512 / ((performance.now() - t0) / 1000);
  await context.dispose();
}
console.log(JSON.stringify(result));
await model.dispose();
await llama.dispose();
