import type * as Tfjs from '@tensorflow/tfjs';
import type { Logger } from '../../common/log.js';

export interface RuntimeInfo {
  onnxruntime: string | null;
  tfjsBackend: string | null;
}

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
  info.tfjsBackend = await loadTfjs(log);
  log.info(info, `inference runtimes: onnxruntime ${info.onnxruntime ?? 'unavailable'}, tfjs backend ${info.tfjsBackend ?? 'unavailable'}`);
  return info;
}

async function loadTfjs(log: Logger): Promise<string | null> {
  try {
    // Optional dependency: present only where its native library could be installed.
    const name = '@tensorflow/tfjs-node';
    const tf = (await import(name)) as typeof Tfjs;
    await tf.ready();
    return tf.getBackend();
  } catch (err) {
    log.debug({ err: (err as Error).message }, 'tfjs-node not available, falling back to WASM');
  }
  try {
    const tf = await import('@tensorflow/tfjs');
    await import('@tensorflow/tfjs-backend-wasm');
    if (!(await tf.setBackend('wasm'))) throw new Error('wasm backend did not initialise');
    await tf.ready();
    return tf.getBackend();
  } catch (err) {
    log.warn({ err }, 'TensorFlow.js is not usable');
    return null;
  }
}
