import type { GoldenVector, Manifest } from '../../proto/index.js';
import { loadTf } from '../../common/tf.js';
import type { ModelWeights } from './weights.js';

/**
 * Golden outputs for a federated candidate. The base's golden vectors keep their inputs; the
 * outputs are the candidate's own, computed here with TF.js from the files about to be published,
 * so a device checks the candidate against what the fleet saw it compute, as for any upload.
 */
export async function candidateGolden(manifest: Manifest, base: ModelWeights, candidateFlat: Float32Array): Promise<GoldenVector[]> {
  const vectors = manifest.golden.vectors;
  if (vectors.length === 0) return [];
  const { tf } = await loadTf();
  const weightData = candidateFlat.buffer.slice(candidateFlat.byteOffset, candidateFlat.byteOffset + candidateFlat.byteLength) as ArrayBuffer;
  const model = await tf.loadLayersModel(
    tf.io.fromMemory({
      modelTopology: base.modelJson.modelTopology as object,
      weightSpecs: base.specs.map((s) => ({ name: s.name, shape: s.shape, dtype: 'float32' as const })),
      weightData,
    }),
  );
  try {
    return vectors.map((v) =>
      tf.tidy(() => {
        // Layers models take their inputs by position, in the manifest's order.
        const xs = manifest.inputs.map((spec) => {
          const t = v.inputs[spec.name]!;
          return tf.tensor(t.data, t.shape, 'float32');
        });
        const ys = model.predict(xs.length === 1 ? xs[0]! : xs);
        const list = Array.isArray(ys) ? ys : [ys];
        const outputs: GoldenVector['outputs'] = {};
        manifest.outputs.forEach((spec, i) => {
          if (!(spec.name in v.outputs)) return;
          const y = list[i]!;
          outputs[spec.name] = { shape: y.shape.slice(), data: Array.from(y.dataSync()) };
        });
        return { inputs: v.inputs, outputs };
      }),
    );
  } finally {
    model.dispose();
  }
}
