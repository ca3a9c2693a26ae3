import type { Logger } from '../../common/log.js';
import { loadTf } from '../../common/tf.js';

export { loadTf, type Tf, type TfRuntime } from '../../common/tf.js';

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
  try {
    info.tfjsBackend = (await loadTf(log)).tfBackend;
  } catch (err) {
    log.warn({ err }, 'TensorFlow.js is not usable');
  }
  log.info(info, `inference runtimes: onnxruntime ${info.onnxruntime ?? 'unavailable'}, tfjs backend ${info.tfjsBackend ?? 'unavailable'}`);
  return info;
}
