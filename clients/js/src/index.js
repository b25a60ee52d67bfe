// Velesio AI Server API client for Node.js 18+ and browsers: fetch-based, no dependencies.
//
//   import { VelesioClient } from 'velesio-client';
//   const client = new VelesioClient('http://localhost:8000', 'your-token');
//   const result = await client.complete('Hello AI!', { max_tokens: 50 });
//   console.log(result.text);                       // = result.choices[0].text
//   for await (const piece of client.streamChat([{ role: 'user', content: 'Hi' }])) process.stdout.write(piece);

export class VelesioError extends Error {
  /** status: HTTP status (0 when no answer came); code: the API's error code, e.g. "model_not_found". */
  constructor(status, code, message, details = null, { retryAfter = null, body = null } = {}) {
    super(`${status} ${code}: ${message}`);
    this.name = new.target.name;
    this.status = status;
    this.code = code;
    this.details = details;
    this.retryAfter = retryAfter; // seconds, when the server sent Retry-After
    this.body = body;
    this.apiMessage = message;
  }
}
export class Unauthorized extends VelesioError {}
export class InvalidRequest extends VelesioError {}
export class ModelNotFound extends VelesioError {}
export class RateLimited extends VelesioError {}
export class ServiceUnavailable extends VelesioError {}
export class QueueFull extends ServiceUnavailable {}
export class InternalError extends VelesioError {}

const BY_CODE = {
  unauthorized: Unauthorized, invalid_request: InvalidRequest, context_exceeded: InvalidRequest,
  model_not_found: ModelNotFound, rate_limited: RateLimited, queue_full: QueueFull,
  no_worker: ServiceUnavailable, busy: ServiceUnavailable, shutting_down: ServiceUnavailable,
  internal_error: InternalError,
};
const BY_STATUS = {
  400: ['invalid_request', InvalidRequest], 401: ['unauthorized', Unauthorized], 404: ['not_found', VelesioError],
  429: ['rate_limited', RateLimited], 503: ['service_unavailable', ServiceUnavailable],
};
const STATUS_OF = {
  invalid_request: 400, context_exceeded: 400, unauthorized: 401, model_not_found: 404, rate_limited: 429,
  queue_full: 503, no_worker: 503, busy: 503, shutting_down: 503, internal_error: 500,
};
const RETRY_STATUSES = [429, 503];

/** The typed error of an answer; reads the seed/OpenAI, llama.cpp (integer code) and A1111 error shapes. */
export function makeError(status, body, retryAfter = null) {
  const err = body && typeof body === 'object' ? body.error : undefined;
  let code, message, details = null;
  if (err && typeof err === 'object') {
    ({ code, message = '', details = null } = err);
  } else {
    message = body && typeof body === 'object' ? (body.detail ?? err ?? '') : String(body ?? '');
  }
  if (Number.isInteger(code) && !status) status = code;
  if (typeof code !== 'string') code = (BY_STATUS[status] ?? [status >= 500 ? 'internal_error' : 'error'])[0];
  status = status || STATUS_OF[code] || 0;
  const Cls = BY_CODE[code] ?? BY_STATUS[status]?.[1] ?? (status >= 500 ? InternalError : VelesioError);
  return new Cls(status, code, String(message), details, { retryAfter, body });
}

function parseRetryAfter(value) {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
}

function textOf(result) {
  const choice = result?.choices?.[0];
  if (!choice) return result?.content ?? '';
  return choice.message ? (choice.message.content ?? '') : (choice.text ?? '');
}

function pieceOf(event) {
  if (!event.choices) return event.content ?? '';
  const choice = event.choices[0];
  return choice ? (choice.delta?.content ?? choice.text ?? '') : '';
}

function fromBase64(b64) {
  if (b64.startsWith('data:')) b64 = b64.slice(b64.indexOf(',') + 1);
  if (typeof Buffer !== 'undefined') return new Uint8Array(Buffer.from(b64, 'base64'));
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

/** A base64 string (data URIs too), Uint8Array or ArrayBuffer → base64 for init_images. */
export function toBase64(image) {
  if (typeof image === 'string') return image;
  const bytes = image instanceof ArrayBuffer ? new Uint8Array(image) : image;
  if (typeof Buffer !== 'undefined') {
    return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('base64');
  }
  let binary = '';
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(binary);
}

/** An A1111 answer: images (PNG bytes), parameters, info (parsed JSON), raw (the JSON as received). */
export function imageResult(raw) {
  let info = raw.info;
  if (typeof info === 'string') {
    try { info = JSON.parse(info); } catch { /* keep the string */ }
  }
  return { images: (raw.images ?? []).map(fromBase64), parameters: raw.parameters ?? {}, info, raw };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class VelesioClient {
  /**
   * @param {string} baseUrl e.g. http://localhost:8000
   * @param {string} apiToken sent as Authorization: Bearer
   * @param {object} [opts] model (default text model), timeout (ms without a byte from the server, 120000),
   *   maxRetries (2; on 429/503), maxRetryWait (ms, 30000; caps Retry-After), fetch (a fetch implementation)
   */
  constructor(baseUrl = 'http://localhost:8000', apiToken = null,
    { model = null, timeout = 120000, maxRetries = 2, maxRetryWait = 30000, fetch: fetchImpl = null } = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, '');
    this.apiToken = apiToken;
    this.model = model;
    this.timeout = timeout;
    this.maxRetries = maxRetries;
    this.maxRetryWait = maxRetryWait;
    this.fetch = fetchImpl ?? globalThis.fetch.bind(globalThis);
  }

  headers(stream = false) {
    const headers = { 'Content-Type': 'application/json', Accept: stream ? 'text/event-stream' : 'application/json' };
    if (this.apiToken) headers.Authorization = `Bearer ${this.apiToken}`;
    return headers;
  }

  /** fetch with retries on 429/503; resolves to an OK Response and an idle timer (`touch`, `done`). */
  async open(method, path, body, stream = false) {
    for (let attempt = 0; ; attempt++) {
      const controller = new AbortController();
      let timer;
      const touch = () => { clearTimeout(timer); timer = setTimeout(() => controller.abort(), this.timeout); };
      const done = () => clearTimeout(timer);
      touch();
      let response;
      try {
        response = await this.fetch(this.baseUrl + path, {
          method, headers: this.headers(stream), signal: controller.signal,
          body: body === undefined ? undefined : JSON.stringify(body),
        });
      } catch (exc) {
        done();
        const reason = controller.signal.aborted ? 'timed out' : (exc.cause?.message ?? exc.message);
        throw new VelesioError(0, 'connection_error', reason);
      }
      if (response.ok) return { response, touch, done };
      const text = await response.text().finally(done);
      let parsed = text;
      try { parsed = JSON.parse(text); } catch { /* not JSON */ }
      const err = makeError(response.status, parsed, parseRetryAfter(response.headers.get('Retry-After')));
      if (!RETRY_STATUSES.includes(err.status) || attempt >= this.maxRetries) throw err;
      const wait = err.retryAfter !== null ? err.retryAfter * 1000 : 500 * 2 ** attempt;
      await sleep(Math.min(wait, this.maxRetryWait));
    }
  }

  async json(method, path, body) {
    const { response, done } = await this.open(method, path, body);
    try {
      return await response.json();
    } finally {
      done();
    }
  }

  /** An async iterator over the text pieces of an SSE answer; stops at [DONE], throws on an error event. */
  async *stream(path, body) {
    const { response, touch, done } = await this.open('POST', path, body, true);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    try {
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (exc) {
          throw new VelesioError(0, 'connection_error', exc.name === 'AbortError' ? 'timed out' : exc.message);
        }
        const { value, done: end } = chunk;
        if (end) break;
        touch();
        buffer += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffer.indexOf('\n')) >= 0) {
          const line = buffer.slice(0, newline).replace(/\r$/, '');
          buffer = buffer.slice(newline + 1);
          if (!line.startsWith('data:')) continue;
          const data = line.slice(5).trim();
          if (data === '[DONE]') return;
          const event = JSON.parse(data);
          if (event?.error) throw makeError(0, event);
          const piece = pieceOf(event);
          if (piece) yield piece;
        }
      }
    } finally {
      done();
      reader.cancel().catch(() => {});
    }
  }

  textBody(key, value, options, stream) {
    const body = { [key]: value, ...options, stream };
    if (this.model && !('model' in options)) body.model = this.model;
    return body;
  }

  async complete(prompt, options = {}) {
    return withText(await this.json('POST', '/completion', this.textBody('prompt', prompt, options, false)));
  }

  async chat(messages, options = {}) {
    return withText(await this.json('POST', '/chat/completions', this.textBody('messages', messages, options, false)));
  }

  streamComplete(prompt, options = {}) {
    return this.stream('/completion', this.textBody('prompt', prompt, options, true));
  }

  streamChat(messages, options = {}) {
    return this.stream('/chat/completions', this.textBody('messages', messages, options, true));
  }

  async txt2img(prompt, options = {}) {
    return imageResult(await this.json('POST', '/sdapi/v1/txt2img', { prompt, ...options }));
  }

  async img2img(initImages, prompt, options = {}) {
    const images = (Array.isArray(initImages) ? initImages : [initImages]).map(toBase64);
    return imageResult(await this.json('POST', '/sdapi/v1/img2img', { init_images: images, prompt, ...options }));
  }

  health() { return this.json('GET', '/health'); }

  models() { return this.json('GET', '/models'); }

  queueStatus() { return this.json('GET', '/queue/status'); }
}

function withText(result) {
  Object.defineProperty(result, 'text', { value: textOf(result), enumerable: false });
  return result;
}

export { VelesioClient as Client };
export default VelesioClient;
