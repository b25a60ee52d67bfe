export interface ClientOptions {
  /** Model sent with text requests that name none. */
  model?: string | null;
  /** Milliseconds without a byte from the server before the request is aborted (default 120000). */
  timeout?: number;
  /** Retries on 429 and 503, after the answer's Retry-After (default 2). */
  maxRetries?: number;
  /** Upper bound of one wait between retries, in milliseconds (default 30000). */
  maxRetryWait?: number;
  /** A fetch implementation (default: globalThis.fetch). */
  fetch?: typeof fetch;
}

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | string;
  content: string;
}

export interface TextOptions {
  model?: string;
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  top_k?: number;
  frequency_penalty?: number;
  presence_penalty?: number;
  stop?: string | string[];
  seed?: number;
  [field: string]: unknown;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export interface Completion {
  id: string;
  object: 'text_completion' | 'chat.completion';
  created: number;
  model: string;
  choices: Array<{
    index: number;
    text?: string;
    message?: { role: string; content: string };
    logprobs: null;
    finish_reason: 'stop' | 'length' | string;
  }>;
  usage: Usage;
  /** choices[0].text or choices[0].message.content (not enumerable). */
  readonly text: string;
  [field: string]: unknown;
}

export interface ImageOptions {
  negative_prompt?: string;
  width?: number;
  height?: number;
  steps?: number;
  cfg_scale?: number;
  sampler_name?: string;
  seed?: number;
  batch_size?: number;
  n_iter?: number;
  denoising_strength?: number;
  [field: string]: unknown;
}

export interface ImageResult {
  /** Decoded images (PNG bytes). */
  images: Uint8Array[];
  parameters: Record<string, unknown>;
  /** The answer's info string parsed as JSON (the string itself if it is not JSON). */
  info: Record<string, unknown> | string;
  raw: { images: string[]; parameters: Record<string, unknown>; info: string; [field: string]: unknown };
}

export type ImageInput = string | Uint8Array | ArrayBuffer;

export class VelesioError extends Error {
  constructor(status: number, code: string, message: string, details?: unknown,
              extra?: { retryAfter?: number | null; body?: unknown });
  /** HTTP status; 0 when no answer came (connection error, timeout) or for an error event in a stream. */
  status: number;
  /** The API's error code: unauthorized, invalid_request, model_not_found, rate_limited, queue_full, ... */
  code: string;
  details: unknown;
  /** Seconds, from Retry-After. */
  retryAfter: number | null;
  body: unknown;
  /** The server's message, without status and code. */
  apiMessage: string;
}
export class Unauthorized extends VelesioError {}
export class InvalidRequest extends VelesioError {}
export class ModelNotFound extends VelesioError {}
export class RateLimited extends VelesioError {}
export class ServiceUnavailable extends VelesioError {}
export class QueueFull extends ServiceUnavailable {}
export class InternalError extends VelesioError {}

export function makeError(status: number, body: unknown, retryAfter?: number | null): VelesioError;
export function toBase64(image: ImageInput): string;
export function imageResult(raw: Record<string, unknown>): ImageResult;

export class VelesioClient {
  constructor(baseUrl?: string, apiToken?: string | null, options?: ClientOptions);
  baseUrl: string;
  apiToken: string | null;
  model: string | null;
  timeout: number;
  maxRetries: number;
  maxRetryWait: number;

  complete(prompt: string, options?: TextOptions): Promise<Completion>;
  chat(messages: ChatMessage[], options?: TextOptions): Promise<Completion>;
  /** Text pieces as they are generated; breaking out of the loop closes the connection. */
  streamComplete(prompt: string, options?: TextOptions): AsyncGenerator<string, void, undefined>;
  streamChat(messages: ChatMessage[], options?: TextOptions): AsyncGenerator<string, void, undefined>;
  txt2img(prompt: string, options?: ImageOptions): Promise<ImageResult>;
  img2img(initImages: ImageInput | ImageInput[], prompt: string, options?: ImageOptions): Promise<ImageResult>;
  health(): Promise<Record<string, any>>;
  models(): Promise<{ text_models: Array<Record<string, any>>; image_models: Array<Record<string, any>>;
    object: 'list'; data: Array<{ id: string; object: 'model'; created: number; owned_by: string; meta: Record<string, any> }> }>;
  queueStatus(): Promise<Record<string, any>>;
}

export { VelesioClient as Client };
export default VelesioClient;
