import type * as Tfjs from '@tensorflow/tfjs';
import type { Logger } from './log.js';

/**
 * TensorFlow.js for both daemons: the agent serves and trains with it, the fleet computes a
 * federated candidate's golden outputs with it.
 */

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
  transposeOperandsFirst(tf, 'BatchMatMul');
  transposeOperandsFirst(tf, '_FusedMatMul');
  return { tf, backend: 'tfjs-wasm', tfBackend: tf.getBackend() };
}

/**
 * The WASM backend's matrix product runs about 10× slower when told to transpose an operand than
 * an explicit Transpose followed by a plain product (tfjs-backend-wasm 4.22: a [64,784]ᵀ×[64,512]
 * product takes 33 ms against 3 ms). Autodiff of every dense layer asks for exactly those products,
 * so local training spent most of its time there. The kernel is re-registered to transpose first;
 * results are identical, the intermediate is freed at once.
 */
function transposeOperandsFirst(tf: Tf, name: 'BatchMatMul' | '_FusedMatMul'): void {
  const original = tf.getKernel(name, 'wasm');
  const transpose = tf.getKernel('Transpose', 'wasm');
  if (!original || !transpose) return;
  type KernelFunc = (params: { inputs: Record<string, Tfjs.TensorInfo>; backend: unknown; attrs?: Record<string, unknown> }) => Tfjs.TensorInfo | Tfjs.TensorInfo[];
  const run = original.kernelFunc as unknown as KernelFunc;
  const runTranspose = transpose.kernelFunc as unknown as KernelFunc;
  tf.unregisterKernel(name, 'wasm');
  tf.registerKernel({
    ...original,
    kernelFunc: ((params: Parameters<KernelFunc>[0]) => {
      const { inputs, backend, attrs = {} } = params;
      if (!attrs.transposeA && !attrs.transposeB) return run(params);
      const temporaries: Tfjs.TensorInfo[] = [];
      const swapped = (x: Tfjs.TensorInfo): Tfjs.TensorInfo => {
        const perm = x.shape.map((_, i) => i);
        const r = perm.length;
        [perm[r - 2], perm[r - 1]] = [perm[r - 1]!, perm[r - 2]!];
        const out = runTranspose({ inputs: { x }, backend, attrs: { perm } }) as Tfjs.TensorInfo;
        temporaries.push(out);
        return out;
      };
      const a = attrs.transposeA ? swapped(inputs.a!) : inputs.a!;
      const b = attrs.transposeB ? swapped(inputs.b!) : inputs.b!;
      try {
        return run({ inputs: { ...inputs, a, b }, backend, attrs: { ...attrs, transposeA: false, transposeB: false } });
      } finally {
        for (const t of temporaries) (backend as { disposeData(id: object): void }).disposeData(t.dataId);
      }
    }) as unknown as Tfjs.KernelFunc,
  });
}
