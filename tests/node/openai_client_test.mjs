// The official `openai` npm client against a KunServe server (run by server/tests/
// server_tools_test.cc against the fake front door, whose default script generates
// "The quick brown fox jumps over the lazy dog. " repeated).
// env: KUN_BASE_URL (e.g. http://127.0.0.1:PORT/v1), KUN_MODEL.
import assert from 'node:assert/strict';
import OpenAI from 'openai';

const baseURL = process.env.KUN_BASE_URL;
const model = process.env.KUN_MODEL ?? 'fake-model';
if (!baseURL) {
  console.error('KUN_BASE_URL is not set');
  process.exit(2);
}
const client = new OpenAI({ baseURL, apiKey: 'unused', maxRetries: 0, timeout: 15000 });
const SCRIPT = 'The quick brown fox jumps over the lazy dog. ';
let checks = 0;

async function check(name, fn) {
  try {
    await fn();
    checks++;
    console.log(`ok   ${name}`);
  } catch (e) {
    console.error(`FAIL ${name}: ${e?.stack ?? e}`);
    process.exitCode = 1;
  }
}

await check('models.list', async () => {
  const page = await client.models.list();
  const ids = page.data.map((m) => m.id);
  assert.deepEqual(ids, [model]);
});

await check('completions, non-streaming', async () => {
  const r = await client.completions.create({ model, prompt: 'Hello', max_tokens: 9 });
  assert.equal(r.object, 'text_completion');
  assert.match(r.id, /^cmpl-/);
  assert.equal(r.choices.length, 1);
  assert.equal(r.choices[0].text, SCRIPT.slice(0, 9));
  assert.equal(r.choices[0].finish_reason, 'length');
  assert.equal(r.usage.completion_tokens, 9);
  assert.equal(r.usage.prompt_tokens, 6); // <s> + 5 bytes with the test's byte tokenizer
  assert.equal(r.usage.total_tokens, 15);
});

await check('completions, streaming with usage', async () => {
  const stream = await client.completions.create({
    model, prompt: 'Hello', max_tokens: 12, stream: true, stream_options: { include_usage: true },
  });
  let text = '';
  let finish = null;
  let usage = null;
  let chunks = 0;
  for await (const chunk of stream) {
    chunks++;
    assert.equal(chunk.object, 'text_completion');
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      text += c.text;
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  assert.equal(text, SCRIPT.slice(0, 12));
  assert.equal(finish, 'length');
  assert.ok(chunks >= 12);
  assert.deepEqual(usage, { prompt_tokens: 6, completion_tokens: 12, total_tokens: 18 });
});

await check('completions, stop sequence', async () => {
  const r = await client.completions.create({ model, prompt: 'x', max_tokens: 40, stop: ['fox'] });
  assert.equal(r.choices[0].text, 'The quick brown ');
  assert.equal(r.choices[0].finish_reason, 'stop');
});

await check('chat.completions, non-streaming', async () => {
  const r = await client.chat.completions.create({
    model,
    messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi!' }],
    max_completion_tokens: 5,
    temperature: 0.7,
    top_p: 0.9,
    seed: 42,
  });
  assert.equal(r.object, 'chat.completion');
  assert.match(r.id, /^chatcmpl-/);
  assert.equal(r.choices[0].message.role, 'assistant');
  assert.equal(r.choices[0].message.content, SCRIPT.slice(0, 5));
  assert.equal(r.choices[0].finish_reason, 'length');
  assert.equal(r.usage.completion_tokens, 5);
});

await check('chat.completions, streaming with usage', async () => {
  const stream = await client.chat.completions.create({
    model,
    messages: [{ role: 'user', content: 'Tell me about foxes' }],
    max_tokens: 20,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = '';
  let role = null;
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      if (c.delta.role) role = c.delta.role;
      if (c.delta.content) text += c.delta.content;
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  assert.equal(role, 'assistant');
  assert.equal(text, SCRIPT.slice(0, 20));
  assert.equal(finish, 'length');
  assert.equal(usage.completion_tokens, 20);
});

await check('chat.completions stream helper (runner API)', async () => {
  const runner = client.chat.completions.stream({
    model, messages: [{ role: 'user', content: 'x' }], max_tokens: 4,
  });
  const final = await runner.finalChatCompletion();
  assert.equal(final.choices[0].message.content, SCRIPT.slice(0, 4));
});

await check('errors: unknown model is a 404 NotFoundError', async () => {
  await assert.rejects(
    client.completions.create({ model: 'no-such-model', prompt: 'x', max_tokens: 2 }),
    (e) => e instanceof OpenAI.NotFoundError && e.status === 404 && e.code === 'model_not_found',
  );
});

await check('errors: n=2 is a 400 BadRequestError naming the field', async () => {
  await assert.rejects(
    client.chat.completions.create({ model, messages: [{ role: 'user', content: 'x' }], n: 2 }),
    (e) => e instanceof OpenAI.BadRequestError && e.status === 400 && e.param === 'n' &&
      /'n'/.test(e.message),
  );
});

await check('errors: prompt beyond the context is a 400', async () => {
  await assert.rejects(
    client.completions.create({ model, prompt: 'y'.repeat(5000), max_tokens: 2 }),
    (e) => e instanceof OpenAI.BadRequestError && e.code === 'context_length_exceeded',
  );
});

console.log(`${checks} checks passed`);
