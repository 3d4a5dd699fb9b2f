// An independent GGUF reader (npm @huggingface/gguf) on a file written by `kunserve gen-model
// --format gguf --tokenizer DIR` (run by tools/kunserve/tests/gguf_model_test.cc): the model and
// tokenizer metadata are there with the types other GGUF readers expect, the vocabulary equals the
// tokenizer.json's token for token, and the tensor directory matches the model's shape.
// usage: node gguf_metadata_check.mjs FILE.gguf TOKENIZER_DIR
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { gguf } from '@huggingface/gguf';

const [file, tokDir] = process.argv.slice(2);
if (!file || !tokDir) {
  console.error('usage: node gguf_metadata_check.mjs FILE.gguf TOKENIZER_DIR');
  process.exit(2);
}
const { metadata, tensorInfos } = await gguf(path.resolve(file), { allowLocalFile: true });
const tj = JSON.parse(fs.readFileSync(path.join(tokDir, 'tokenizer.json'), 'utf8'));

assert.equal(metadata.version, 3);
assert.equal(metadata['general.architecture'], 'llama');
const arch = metadata['general.architecture'];
const byteLevel = JSON.stringify(tj.decoder ?? {}).includes('ByteLevel');
assert.equal(metadata['tokenizer.ggml.model'], byteLevel ? 'gpt2' : 'llama');

// The vocabulary, id by id.
const expected = [];
for (const [tok, id] of Object.entries(tj.model.vocab)) expected[id] = tok;
for (const a of tj.added_tokens ?? []) expected[a.id] = a.content;
const tokens = metadata['tokenizer.ggml.tokens'];
assert.equal(tokens.length, expected.length);
// The reader decodes strings with TextDecoder, which drops a leading U+FEFF (Llama 2 has a
// token that is exactly the BOM); the bytes in the file are the token's.
const asRead = (s) => (s.startsWith('\uFEFF') ? s.slice(1) : s);
for (let i = 0; i < tokens.length; i++) {
  if (tokens[i] !== asRead(expected[i])) assert.fail(`token ${i}: ${JSON.stringify(tokens[i])} != ${JSON.stringify(expected[i])}`);
}
const types = metadata['tokenizer.ggml.token_type'];
assert.equal(types.length, tokens.length);
for (const a of tj.added_tokens ?? []) assert.ok([2, 3, 4].includes(types[a.id]), `added token ${a.id} type ${types[a.id]}`);
if (byteLevel) {
  const merges = metadata['tokenizer.ggml.merges'];
  assert.equal(merges.length, tj.model.merges.length);
  const m0 = tj.model.merges[0];
  assert.equal(merges[0], Array.isArray(m0) ? m0.join(' ') : m0);
} else {
  const scores = metadata['tokenizer.ggml.scores'];
  assert.equal(scores.length, tokens.length);
  assert.ok(scores.every((s) => typeof s === 'number' && Number.isFinite(s)));
  assert.equal(types[expected.indexOf('<0x41>')], 6, 'byte pieces are BYTE tokens');
}
const bos = metadata['tokenizer.ggml.bos_token_id'];
const eos = metadata['tokenizer.ggml.eos_token_id'];
assert.ok(Number.isInteger(bos) && bos >= 0 && bos < tokens.length);
assert.ok(Number.isInteger(eos) && eos >= 0 && eos < tokens.length);
assert.equal(typeof metadata['tokenizer.ggml.add_bos_token'], 'boolean');

// The model's shape and tensor directory.
const layers = metadata[`${arch}.block_count`];
const hidden = metadata[`${arch}.embedding_length`];
assert.ok(layers > 0 && hidden > 0);
assert.equal(metadata[`${arch}.vocab_size`], tokens.length);
const names = new Set(tensorInfos.map((t) => t.name));
const emb = tensorInfos.find((t) => t.name === 'token_embd.weight');
assert.ok(emb, 'token_embd.weight');
assert.deepEqual(emb.shape.map(Number), [hidden, tokens.length]);
for (let l = 0; l < layers; l++) {
  for (const t of ['attn_q', 'attn_k', 'attn_v', 'attn_output', 'ffn_gate', 'ffn_up', 'ffn_down', 'attn_norm', 'ffn_norm']) {
    assert.ok(names.has(`blk.${l}.${t}.weight`), `blk.${l}.${t}.weight`);
  }
}
console.log(`ok: ${file}: ${metadata['tokenizer.ggml.model']} vocabulary of ${tokens.length} tokens, ${tensorInfos.length} tensors, ${layers} layers`);
