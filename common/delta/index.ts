/** Delta updates of model files: the encoder, the reference decoder and the tensor layouts they use. */
export { createPatch, type CreateOptions, type PatchReport, type SectionReport } from './encode.js';
export { applyPatch, applyPatchBuffer, applyPatchFile, fileSource, memorySource, type ApplyOptions, type ApplyResult, type ByteSource } from './apply.js';
export { decodeHeader as readPatchHeader, type PatchHeader } from './bytes.js';
export { layoutOf, type TensorRange } from './layout.js';
