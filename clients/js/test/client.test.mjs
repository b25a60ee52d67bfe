// The client against real velesio-router and velesio-worker processes that this file starts on loopback.
// VELESIO_BIN: the folder holding the console scripts (default: the repository's .venv/bin).
// VELESIO_TEST_IMAGES=1 also starts a worker serving the embedded tiny-sd image model (needs the diffusers
// backend and the router's AUTOMATIC1111 routes); without it the image test is skipped.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import VelesioClient, {
  InvalidRequest, ModelNotFound, QueueFull, RateLimited, ServiceUnavailable, Unauthorized, VelesioError,
  imageResult, makeError, toBase64,
} from '../src/index.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const BIN = resolve(process.env.VELESIO_BIN ?? join(HERE, '..', '..', '..', '.venv', 'bin'));
const TOKEN = 'js-test-token';
const MODEL = 'smollm2-135m-instruct';
const QA = 'Q: What is the capital of France?\nA:';
const CHAT = [{ role: 'user', content: 'What is the capital of France? Answer in one sentence.' }];
const GREEDY = { temperature: 0, max_tokens: 24 };
const SEEDED = { temperature: 0.8, seed: 7, max_tokens: 16 };

const tmp = mkdtempSync(join(tmpdir(), 'velesio-js-'));
const procs = [];

function freePort() {
  return new Promise((ok, fail) => {
    const server = createServer();
    server.once('error', fail);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => ok(port));
    });
  });
}

function start(name, args, env = {}) {
  const log = join(tmp, `${name}.log`);
  const fd = openSync(log, 'a');
  const proc = spawn(join(BIN, args[0]), args.slice(1), { env: { ...process.env, ...env }, stdio: ['ignore', fd, fd] });
  proc.log = log;
  procs.push(proc);
  return proc;
}

function stop(proc) {
  if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve();
  return new Promise((ok) => {
    const kill = setTimeout(() => proc.kill('SIGKILL'), 5000);
    proc.once('exit', () => { clearTimeout(kill); ok(); });
    proc.kill('SIGTERM');
  });
}

async function startRouter(routerCfg) {
  const [port, meshPort] = [await freePort(), await freePort()];
  const config = join(tmp, `router-${port}.yaml`);
  writeFileSync(config, `router: ${JSON.stringify(routerCfg)}\n`); // JSON is YAML
  const proc = start(`router-${port}`, ['velesio-router', '--config', config, '--host', '127.0.0.1',
    '--port', String(port), '--mesh-bind', `tcp://127.0.0.1:${meshPort}`], { API_TOKENS: TOKEN });
  return { proc, url: `http://127.0.0.1:${port}`, mesh: `tcp://127.0.0.1:${meshPort}` };
}

async function waitHealth(router, predicate, timeoutMs = 90000) {
  const deadline = Date.now() + timeoutMs;
  let last = null;
  while (Date.now() < deadline) {
    if (router.proc.exitCode !== null) break;
    try {
      last = await (await fetch(`${router.url}/health`)).json();
      if (predicate(last)) return last;
    } catch { /* not listening yet */ }
    await new Promise((ok) => setTimeout(ok, 100));
  }
  const log = readFileSync(router.proc.log, 'utf8').slice(-3000);
  throw new Error(`router never reached the expected state; last /health: ${JSON.stringify(last)}\n${log}`);
}

let mesh; // router + SmolLM2 worker
let narrow; // one request at a time per token, no worker: a text request holds the slot for worker_wait_s
let client;

before(async () => {
  mesh = await startRouter({ rate_limit: { requests_per_minute: 100000, concurrent: 1000 } });
  narrow = await startRouter({ rate_limit: { requests_per_minute: 1000, concurrent: 1 }, worker_wait_s: 2 });
  const workerCfg = join(tmp, 'worker.yaml');
  writeFileSync(workerCfg, `worker:\n  models:\n    - name: ${MODEL}\n      backend: llama-cpp\n      slots: 1\n`
    + '      options: {n_ctx: 2048, n_threads: 1}\n');
  start('worker', ['velesio-worker', '--router', mesh.mesh, '--config', workerCfg, '--name', 'js-text-1']);
  const names = ['js-text-1'];
  if (process.env.VELESIO_TEST_IMAGES === '1') {
    const imageCfg = join(tmp, 'image-worker.yaml');
    writeFileSync(imageCfg, 'worker:\n  models:\n'
      + '    - {name: tiny-sd, backend: diffusers, slots: 1, options: {embedded: true}}\n');
    start('image-worker', ['velesio-worker', '--router', mesh.mesh, '--config', imageCfg, '--name', 'js-image-1']);
    names.push('js-image-1');
  }
  await waitHealth(mesh, (h) => names.every((name) => h.workers.some((w) => w.id === name)), 240000);
  await waitHealth(narrow, () => true);
  client = new VelesioClient(mesh.url, TOKEN, { maxRetries: 0 });
});

after(async () => {
  await Promise.all(procs.map(stop));
  rmSync(tmp, { recursive: true, force: true });
});

describe('text', () => {
  test('complete and chat answer real text', async () => {
    const r = await client.complete(QA, GREEDY);
    assert.equal(r.object, 'text_completion');
    assert.match(r.text, /Paris/);
    assert.equal(r.choices[0].text, r.text); // the seed's shape is kept
    assert.ok(r.usage.completion_tokens > 0);
    assert.ok(!Object.keys(r).includes('text'));
    const c = await client.chat(CHAT, GREEDY);
    assert.equal(c.object, 'chat.completion');
    assert.match(c.text, /Paris/);
  });

  test('streamed pieces concatenate to the non-streamed text (same seed)', async () => {
    const whole = (await client.complete('Once upon a time', SEEDED)).text;
    const pieces = [];
    for await (const piece of client.streamComplete('Once upon a time', SEEDED)) pieces.push(piece);
    assert.ok(pieces.length > 1 && pieces.every((p) => typeof p === 'string' && p.length > 0));
    assert.equal(pieces.join(''), whole);
    const chatWhole = (await client.chat(CHAT, SEEDED)).text;
    let streamed = '';
    for await (const piece of client.streamChat(CHAT, SEEDED)) streamed += piece;
    assert.equal(streamed, chatWhole);
  });

  test('breaking out of a stream closes it', async () => {
    for await (const piece of client.streamComplete('Count to one hundred:', { max_tokens: 200, temperature: 0 })) {
      assert.ok(piece);
      break;
    }
    assert.equal(typeof (await client.complete('Hi', { max_tokens: 2 })).text, 'string');
  });

  test('a default model is sent when the request names none', async () => {
    const named = new VelesioClient(mesh.url, TOKEN, { model: MODEL, maxRetries: 0 });
    assert.equal((await named.complete('Hi', { max_tokens: 2 })).model, MODEL);
  });
});

describe('status routes', () => {
  test('health, models, queueStatus', async () => {
    const health = await client.health();
    assert.equal(health.status, 'healthy');
    assert.equal(health.services.llm_worker, 'ready');
    const models = await client.models();
    assert.ok(models.text_models.some((m) => m.name === MODEL));
    const queue = await client.queueStatus();
    assert.ok(queue.active_workers >= 1 && 'queue_depth' in queue);
  });
});

describe('errors', () => {
  test('typed errors carry the API codes', async () => {
    await assert.rejects(new VelesioClient(mesh.url, 'wrong-token').complete('Hi'),
      (e) => e instanceof Unauthorized && e.status === 401 && e.code === 'unauthorized');
    await assert.rejects(client.complete('Hi', { model: 'no-such-model' }),
      (e) => e instanceof ModelNotFound && e.status === 404 && e.code === 'model_not_found');
    await assert.rejects(client.chat(CHAT, { temperature: 5 }),
      (e) => e instanceof InvalidRequest && e.code === 'invalid_request' && /temperature/.test(e.apiMessage));
    await assert.rejects(async () => { for await (const _ of client.streamChat(CHAT, { temperature: -1 })); },
      (e) => e instanceof InvalidRequest && e.status === 400);
    await assert.rejects(new VelesioClient('http://127.0.0.1:1', TOKEN, { timeout: 5000 }).health(),
      (e) => e instanceof VelesioError && e.status === 0 && e.code === 'connection_error');
  });

  test('every dialect error shape is read', () => {
    assert.ok(makeError(503, { error: { code: 'queue_full', message: 'full' } }) instanceof QueueFull);
    const llama = makeError(0, { error: { code: 503, message: 'Loading model', type: 'unavailable_error' } });
    assert.ok(llama instanceof ServiceUnavailable && llama.status === 503);
    const a1111 = makeError(422, { error: 'HTTPException', detail: 'Sampler not found' });
    assert.equal(a1111.apiMessage, 'Sampler not found');
    assert.ok(makeError(0, { error: { code: 'rate_limited', message: 'm' } }) instanceof RateLimited);
  });
});

describe('retries', () => {
  function holdSlot() {
    const held = new VelesioClient(narrow.url, TOKEN, { maxRetries: 0 }).complete('Hi').catch((e) => e);
    return new Promise((ok) => setTimeout(() => ok({ held }), 500)); // wrapped: a promise would be adopted
  }

  test('429 is retried after Retry-After', async () => {
    const { held } = await holdSlot();
    await assert.rejects(new VelesioClient(narrow.url, TOKEN, { maxRetries: 0 }).models(),
      (e) => e instanceof RateLimited && e.status === 429 && e.retryAfter === 1);
    const started = performance.now();
    const models = await new VelesioClient(narrow.url, TOKEN, { maxRetries: 3 }).models();
    const elapsed = performance.now() - started;
    assert.deepEqual(models, { text_models: [], image_models: [], object: 'list', data: [] });
    assert.ok(elapsed >= 1000, `answered after ${elapsed} ms, before Retry-After`);
    const err = await held;
    assert.ok(err instanceof ServiceUnavailable && err.code === 'no_worker' && err.retryAfter > 0);
  });

  test('maxRetryWait caps the wait', async () => {
    const { held } = await holdSlot();
    const started = performance.now();
    await assert.rejects(new VelesioClient(narrow.url, TOKEN, { maxRetries: 1, maxRetryWait: 200 }).models(),
      RateLimited);
    const elapsed = performance.now() - started;
    assert.ok(elapsed >= 200 && elapsed < 950, `${elapsed} ms, not the 1 s of Retry-After`);
    await held;
  });
});

const pngSize = (png) => {
  const view = new DataView(png.buffer, png.byteOffset, png.byteLength);
  assert.deepEqual([...png.subarray(0, 4)], [0x89, 0x50, 0x4e, 0x47], 'not a PNG');
  return [view.getUint32(16), view.getUint32(20)];
};

describe('images', () => {
  test('imageResult decodes images and parses info', () => {
    const png = Uint8Array.from([0x89, 0x50, 0x4e, 0x47, 1, 2, 3]);
    const r = imageResult({ images: [toBase64(png), `data:image/png;base64,${toBase64(png.buffer)}`],
      parameters: { width: 64 }, info: '{"seed": 5}' });
    assert.deepEqual(r.images.map((i) => [...i]), [[...png], [...png]]);
    assert.deepEqual(r.info, { seed: 5 });
    assert.equal(imageResult({ images: [], info: 'not json' }).info, 'not json');
  });

  test('txt2img and img2img on a live image model', async (t) => {
    const { image_models: imageModels } = await client.models();
    if (!imageModels.length) {
      t.skip('no image model is live on the test router (/models lists no image_models)');
      return;
    }
    const r = await client.txt2img('a lighthouse at dusk', { width: 64, height: 64, steps: 2, seed: 1234 });
    assert.equal(r.images.length, 1);
    assert.deepEqual(pngSize(r.images[0]), [64, 64]);
    assert.equal(r.info.seed, 1234);
    const again = await client.img2img(r.images[0], 'a lighthouse at night', { width: 64, height: 64, steps: 2 });
    assert.deepEqual(pngSize(again.images[0]), [64, 64]);
  });
});
