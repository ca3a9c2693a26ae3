import type * as Tfjs from '@tensorflow/tfjs';
import type { Logger } from '../../common/log.js';

export interface RuntimeInfo {
  onnxruntime: string | null;
  tfjsBackend: string | null;
}

export type Tf = typeof Tfjs;

/** The TensorFlow.js module in use and the backend it runs on. */
export interface TfRuntime {
  tf: Tf;
  /** `tfjs-node` or `tfjs-wasm`: what LoadedModel.backend reports. */
  backend: 'tfjs-node' | 'tfjs-wasm';
  /** tf.getBackend(): `tensorflow` or `wasm`. */
  tfBackend: string;
}

let tfRuntime: Promise<TfRuntime> | null = null;

/**
 * Loads the inference runtimes and says which are usable. TensorFlow.js prefers the native
 * tfjs-node backend; where it did not install (it downloads libtensorflow at install time), the
 * WASM backend that ships inside @tensorflow/tfjs-backend-wasm takes over.
 */
export async function probeRuntimes(log: Logger): Promise<RuntimeInfo> {
  const info: RuntimeInfo = { onnxruntime: null, tfjsBackend: null };
  try {
    const ort = await import('onnxruntime-node');
    info.onnxruntime = ort.env.versions.node ?? ort.env.versions.common ?? 'unknown';
  } catch (err) {
    log.warn({ err }, 'onnxruntime-node is not usable');
  }
  try {
    info.tfjsBackend = (await loadTf(log)).tfBackend;
  } catch (err) {
    log.warn({ err }, 'TensorFlow.js is not usable');
  }
  log.info(info, `inference runtimes: onnxruntime ${info.onnxruntime ?? 'unavailable'}, tfjs backend ${info.tfjsBackend ?? 'unavailable'}`);
  return info;
}

/**
 * The one TensorFlow.js instance of this process. Loaded once: tf keeps a global engine and
 * backend registry, and a second copy (tfjs-node next to plain tfjs) would hold tensors the other
 * cannot see. A failure is remembered too; it does not get better by retrying in the same process.
 */
export function loadTf(log?: Logger): Promise<TfRuntime> {
  tfRuntime ??= importTf(log);
  return tfRuntime;
}

async function importTf(log?: Logger): Promise<TfRuntime> {
  try {
    // Optional dependency: present only where its native library could be installed. The name is
    // in a variable so TypeScript does not insist on resolving it.
    const name = '@tensorflow/tfjs-node';
    const tf = (await import(name)) as Tf;
    await tf.ready();
    return { tf, backend: 'tfjs-node', tfBackend: tf.getBackend() };
  } catch (err) {
    log?.debug({ err: (err as Error).message }, 'tfjs-node not available, falling back to WASM');
  }
  const tf = await import('@tensorflow/tfjs');
  await import('@tensorflow/tfjs-backend-wasm');
  if (!(await tf.setBackend('wasm'))) throw new Error('the TensorFlow.js wasm backend did not initialise');
  await tf.ready();
  return { tf, backend: 'tfjs-wasm', tfBackend: tf.getBackend() };
}
