import type { LayoutKind } from '../../proto/delta.js';
import { onnxTensorRanges } from './onnx.js';
import { shardBaseName, tfjsShardRanges, tfjsWeightsFiles } from './tfjs.js';
import { LayoutError, type TensorRange } from './types.js';

export { LayoutError, type TensorRange } from './types.js';
export { onnxTensorRanges } from './onnx.js';
export { tfjsShardRanges, tfjsWeightsFiles } from './tfjs.js';

export interface Layout {
  kind: LayoutKind;
  ranges: TensorRange[];
}

/**
 * Where the tensors of one model file are, if its kind is known: ONNX by the `.onnx` extension
 * (content is never sniffed, so a file of another kind is never misread as ONNX), a TF.js weight
 * shard by being named in `modelJson`'s weightsManifest. A file its parser rejects gets no layout;
 * the encoder then diffs it as plain bytes.
 */
export function layoutOf(fileName: string, bytes: Uint8Array, modelJson?: unknown): Layout {
  try {
    if (fileName.toLowerCase().endsWith('.onnx')) return { kind: 'onnx', ranges: onnxTensorRanges(bytes) };
    const base = shardBaseName(fileName);
    if (modelJson !== undefined && tfjsWeightsFiles(modelJson).some((p) => shardBaseName(p) === base)) {
      return { kind: 'tfjs', ranges: tfjsShardRanges(modelJson, base, bytes.length) };
    }
  } catch (e) {
    if (!(e instanceof LayoutError)) throw e;
  }
  return { kind: 'none', ranges: [] };
}
