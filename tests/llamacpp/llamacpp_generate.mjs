// llama.cpp (node-llama-cpp's prebuilt CPU build) on a GGUF file: the prompt's token ids as
// llama.cpp encodes it (with BOS where the file's tokenizer.ggml.add_bos_token says), then greedy
// tokens and their text. Prints one JSON object: {prompt_token_ids, tokens, text}.
// usage: node llamacpp_generate.mjs FILE.gguf PROMPT_FILE MAX_TOKENS [THREADS]
import fs from 'node:fs';
import { getLlama, LlamaLogLevel } from 'node-llama-cpp';

const [file, promptFile, maxTokensArg, threadsArg] = process.argv.slice(2);
if (!file || !promptFile || !maxTokensArg) {
  console.error('usage: node llamacpp_generate.mjs FILE.gguf PROMPT_FILE MAX_TOKENS [THREADS]');
  process.exit(2);
}
const prompt = fs.readFileSync(promptFile, 'utf8');
const maxTokens = Number(maxTokensArg);
// build: 'never': the prebuilt binaries or nothing (no download, no compiler run).
const llama = await getLlama({ gpu: false, build: 'never', logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath: file });
const addBos = model.fileInfo.metadata?.tokenizer?.ggml?.add_bos_token;
const ids = [...(addBos === false ? [] : [model.tokens.bos]), ...model.tokenize(prompt)];
const context = await model.createContext({
  contextSize: Math.max(256, ids.length + maxTokens + 8),
  threads: Number(threadsArg ?? 2),
  sequences: 1,
});
const tokens = [];
// temperature 0: llama.cpp's greedy sampler (argmax), no repetition penalty.
for await (const t of context.getSequence().evaluate(ids, { temperature: 0 })) {
  tokens.push(t);
  if (tokens.length >= maxTokens) break;
}
console.log(JSON.stringify({ prompt_token_ids: ids, tokens, text: model.detokenize(tokens) }));
await context.dispose();
await model.dispose();
await llama.dispose();
