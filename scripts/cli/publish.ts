import { createHash } from 'node:crypto';
import { createReadStream, readFileSync, readdirSync, statSync } from 'node:fs';
import { basename, dirname, join, relative, sep } from 'node:path';
import { z } from 'zod';
import {
  EdgefleetError,
  HealthPolicy,
  Lineage,
  TrainingSpec,
  Manifest,
  TensorSpec,
  MAX_PAYLOAD_BYTES,
  TensorValue,
  summarizeIssues,
  type MethodParams,
  type Baseline,
  type GoldenVector,
  type Histogram,
  type ModelDraftInput,
  type ModelFile,
  type ModelRuntime,
  type SignedManifest,
} from '../../proto/index.js';
import { loadModel, runGolden } from '../../agent/runtime/load.js';
import { describeOnnx, type ModelSignature } from '../../agent/runtime/onnx.js';
import { argmaxAt, tensorFromJson, tensorToJson } from '../../agent/runtime/tensor.js';
import { describeTfjs } from '../../agent/runtime/tfjs.js';
import type { LoadedModel, Tensor, TensorMap } from '../../agent/runtime/types.js';
import type { ArtifactClient } from './artifacts.js';

/**
 * What `edgefleet model publish` works out on the operator's machine before anything is uploaded:
 * the files and their hashes, the model's signature, golden vectors with the outputs the model
 * really gives (run in the same runtime the devices use), and baseline histograms. A model whose
 * outputs miss the expected ones is refused here, not on a device after a download.
 */

/** `--golden-inputs`: expected outputs given are kept; a vector without `outputs` gets the model's. */
export const GoldenInputsFile = z
  .object({
    vectors: z
      .array(z.object({ inputs: z.record(z.string(), TensorValue), outputs: z.record(z.string(), TensorValue).optional() }).strict())
      .max(64),
    tolerance: z.object({ abs: z.number().min(0).optional(), rel: z.number().min(0).optional() }).strict().optional(),
  })
  .strict();

/** `--baseline-inputs`: the same shape (outputs, if any, are ignored), a sample of what the model will see. */
export const BaselineInputsFile = z
  .object({ vectors: z.array(z.object({ inputs: z.record(z.string(), TensorValue), outputs: z.unknown().optional() }).strict()).min(1).max(100_000) })
  .strict();

export const SignatureFile = z.object({ inputs: z.array(TensorSpec).min(1), outputs: z.array(TensorSpec).min(1) }).strict();

export const BASELINE_BINS = 10;

export interface ModelFiles {
  dir: string;
  entry: string;
  runtime: ModelRuntime;
  files: ModelFile[];
}

export interface DraftOptions {
  name: string;
  version?: number | undefined;
  goldenInputs?: string | undefined;
  baselineInputs?: string | undefined;
  /** Golden vectors (inputs and expected outputs) and output baselines are the parent's. */
  referenceParent?: boolean | undefined;
  parent?: SignedManifest | null | undefined;
  /** Replaces the signature the runtime reports (e.g. a graph model's unknown output shape). */
  signature?: string | undefined;
  health?: string | undefined;
  /** Merged into the lineage: dataSnapshot, hyperparameters, metrics, method... */
  lineage?: string | undefined;
  /** A TrainingSpec (JSON): devices may train the model for federated rounds. */
  training?: string | undefined;
  expiresAt?: number | null | undefined;
}

/** The seam to the inference runtimes (agent/runtime), so tests can count what runs. */
export interface PublishRuntime {
  describe(files: ModelFiles): Promise<ModelSignature>;
  load(manifest: Manifest, dir: string): Promise<LoadedModel>;
}

export const realRuntime: PublishRuntime = {
  describe: (f) => (f.runtime === 'onnx' ? describeOnnx(join(f.dir, f.entry)) : describeTfjs(f.dir, f.runtime, f.entry)),
  load: loadModel,
};

function readJson<S extends z.ZodType>(schema: S, file: string, what: string): z.output<S> {
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    throw new EdgefleetError('EF_BAD_PARAMS', `${what} ${file}: ${(e as Error).message}`);
  }
  const parsed = schema.safeParse(raw);
  if (!parsed.success) throw new EdgefleetError('EF_BAD_PARAMS', `${what} ${file}: ${summarizeIssues(parsed.error.issues)}`);
  return parsed.data;
}

/** Streamed, so hashing a large model does not hold up the CLI's event loop (the agent's sha256File is synchronous). */
async function hashFile(path: string): Promise<{ sha256: string; size: number }> {
  const hash = createHash('sha256');
  let size = 0;
  for await (const chunk of createReadStream(path)) {
    hash.update(chunk as Buffer);
    size += (chunk as Buffer).length;
  }
  return { sha256: hash.digest('hex'), size };
}

function walk(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true })
    .filter((d) => !d.name.startsWith('.'))
    .flatMap((d) => (d.isDirectory() ? walk(join(dir, d.name)) : d.isFile() ? [join(dir, d.name)] : []));
}

function runtimeOf(dir: string, entry: string): ModelRuntime {
  if (entry.endsWith('.onnx')) return 'onnx';
  try {
    const json = JSON.parse(readFileSync(join(dir, entry), 'utf8')) as { format?: string; modelTopology?: { class_name?: string; node?: unknown } };
    if (json.format === 'graph-model' || json.modelTopology?.node !== undefined) return 'tfjs-graph';
    if (json.format === 'layers-model' || json.modelTopology?.class_name !== undefined) return 'tfjs-layers';
  } catch {
    // not JSON: fall through
  }
  throw new EdgefleetError('EF_MODEL_INVALID', `cannot tell the runtime of ${entry}: give --runtime onnx|tfjs-graph|tfjs-layers`);
}

/**
 * The files of a model: one file (an .onnx), or every file under a directory (hidden ones left out).
 * The entry is `--entry`, else the only .onnx file, else model.json.
 */
export async function collectModelFiles(path: string, opts: { runtime?: ModelRuntime | undefined; entry?: string | undefined } = {}): Promise<ModelFiles> {
  const st = statSync(path);
  const dir = st.isDirectory() ? path : dirname(path);
  const paths = st.isDirectory() ? walk(path).map((p) => relative(path, p).split(sep).join('/')).sort() : [basename(path)];
  if (paths.length === 0) throw new EdgefleetError('EF_MODEL_INVALID', `${path} holds no files`);
  const onnx = paths.filter((p) => p.endsWith('.onnx'));
  const entry = opts.entry ?? (onnx.length === 1 ? onnx[0] : paths.includes('model.json') ? 'model.json' : undefined);
  if (entry === undefined || !paths.includes(entry)) {
    throw new EdgefleetError('EF_MODEL_INVALID', `cannot tell which file of ${path} the runtime opens: give --entry <file> (one of ${paths.slice(0, 10).join(', ')})`);
  }
  const files = await Promise.all(paths.map(async (p) => ({ path: p, ...(await hashFile(join(dir, p))) })));
  return { dir, entry, runtime: opts.runtime ?? runtimeOf(dir, entry), files };
}

/**
 * Everything `models.publish` needs on the artifact server: the model's files (those it lacks),
 * and the draft itself when it is too large for an operator request (golden vectors of images).
 * Returns how many files went up and the params to publish with.
 */
export async function uploadModel(artifacts: ArtifactClient, files: ModelFiles, draft: ModelDraftInput): Promise<{ uploaded: number; params: MethodParams<'models.publish'> }> {
  let uploaded = 0;
  for (const file of files.files) {
    if (await artifacts.has(file.sha256)) continue;
    await artifacts.upload(file.sha256, { path: join(files.dir, file.path), size: file.size });
    uploaded++;
  }
  const json = Buffer.from(JSON.stringify(draft), 'utf8');
  // Headroom for the request envelope ({id, method}) around the params.
  if (json.length <= MAX_PAYLOAD_BYTES.opsRequest - 1024) return { uploaded, params: draft };
  const sha256 = createHash('sha256').update(json).digest('hex');
  await artifacts.upload(sha256, json);
  return { uploaded, params: { draftSha256: sha256 } };
}

/**
 * A histogram of `values` over BASELINE_BINS equal bins from `lo` to `hi`; values outside fall in
 * the end bins, non-finite ones are left out. Null when nothing finite remains.
 */
export function histogram(values: Iterable<number>, range?: { lo: number; hi: number }): Histogram | null {
  const finite: number[] = [];
  for (const v of values) if (Number.isFinite(v)) finite.push(v);
  if (finite.length === 0) return null;
  let lo = range?.lo ?? Infinity;
  let hi = range?.hi ?? -Infinity;
  if (!range) for (const v of finite) [lo, hi] = [Math.min(lo, v), Math.max(hi, v)];
  if (!(hi > lo)) {
    const pad = Math.max(0.5, Math.abs(lo) * 1e-6);
    // Clamped: a value at the end of the doubles padded outward would be infinite.
    [lo, hi] = [Math.max(-Number.MAX_VALUE, lo - pad), Math.min(Number.MAX_VALUE, hi + pad)];
  }
  // Divided before subtracting, so that a range as wide as the doubles does not overflow.
  const width = hi / BASELINE_BINS - lo / BASELINE_BINS;
  const binOf = (v: number): number => {
    let i = Math.floor(v / width - lo / width);
    if (!Number.isFinite(i)) i = Math.floor(((v - lo) / (hi - lo)) * BASELINE_BINS);
    return Number.isFinite(i) ? Math.min(BASELINE_BINS - 1, Math.max(0, i)) : 0;
  };
  const counts = new Array<number>(BASELINE_BINS).fill(0);
  for (const v of finite) counts[binOf(v)]! += 1;
  const edges = Array.from({ length: BASELINE_BINS + 1 }, (_, i) => (i === BASELINE_BINS ? hi : Math.min(hi, lo + i * width)));
  return { edges, probs: counts.map((c) => c / finite.length) };
}

function numbers(t: Tensor): number[] {
  return Array.from(t.data as ArrayLike<number | bigint>, Number);
}

function inputsOf(manifest: Manifest, raw: Record<string, TensorValue>, where: string): TensorMap {
  const out: TensorMap = {};
  for (const spec of manifest.inputs) {
    const v = raw[spec.name];
    if (v === undefined) throw new EdgefleetError('EF_BAD_PARAMS', `${where}: no value for input ${spec.name}`);
    out[spec.name] = tensorFromJson(spec.dtype, v, `${where}.${spec.name}`);
  }
  const extra = Object.keys(raw).filter((k) => !manifest.inputs.some((s) => s.name === k));
  if (extra.length > 0) throw new EdgefleetError('EF_BAD_PARAMS', `${where}: the model has no input ${extra.join(', ')}`);
  return out;
}

/** Output baselines over a sample; [0, 1] edges for outputs that are probabilities, else the observed range. */
async function baselineOf(model: LoadedModel, manifest: Manifest, vectors: readonly { inputs: Record<string, TensorValue> }[]): Promise<Baseline> {
  const seenIn = new Map<string, number[]>();
  const seenOut = new Map<string, number[]>();
  const add = (m: Map<string, number[]>, name: string, vs: number[]): void => {
    const arr = m.get(name) ?? [];
    for (const v of vs) arr.push(v);
    m.set(name, arr);
  };
  for (let i = 0; i < vectors.length; i++) {
    const inputs = inputsOf(manifest, (vectors[i] as { inputs: Record<string, TensorValue> }).inputs, `baseline vector ${i}`);
    for (const [n, t] of Object.entries(inputs)) add(seenIn, n, numbers(t));
    const outputs = await model.run(inputs);
    for (const [n, t] of Object.entries(outputs)) add(seenOut, n, numbers(t));
  }
  const hist = (m: Map<string, number[]>, probability: (name: string, vs: number[]) => boolean): Record<string, Histogram> => {
    const out: Record<string, Histogram> = {};
    for (const [name, vs] of m) {
      const h = histogram(vs, probability(name, vs) ? { lo: 0, hi: 1 } : undefined);
      if (h) out[name] = h;
    }
    return out;
  };
  const confidence = manifest.health.confidenceOutput;
  const outputs = hist(seenOut, (name, vs) => name === confidence || (vs.length > 0 && vs.every((v) => v >= 0 && v <= 1)));
  // Class probabilities: the spread of values over all classes hides which class wins (a model
  // that answers "setosa" to everything has the same spread), so the winning class gets its own
  // histogram, one bin per class. The device compares live traffic against it (`<name>:argmax`).
  for (const spec of manifest.outputs) {
    const k = spec.shape[spec.shape.length - 1] ?? -1;
    const vs = seenOut.get(spec.name);
    if (!vs || k < 2 || k > 100 || !outputs[spec.name] || !(spec.name === confidence || vs.every((v) => v >= 0 && v <= 1))) continue;
    const counts = new Array<number>(k).fill(0);
    for (let r = 0; r + k <= vs.length; r += k) counts[argmaxAt(vs, r, k)]! += 1;
    const rows = vs.length / k;
    outputs[`${spec.name}:argmax`] = { edges: Array.from({ length: k + 1 }, (_, i) => i), probs: counts.map((c) => c / rows) };
  }
  return { inputs: hist(seenIn, () => false), outputs };
}

/**
 * The draft manifest `models.publish` signs. Runs the model: fills in golden outputs, checks every
 * expected output against tolerance (EF_GOLDEN_MISMATCH), and measures baselines.
 */
export async function buildDraft(files: ModelFiles, opts: DraftOptions, runtime: PublishRuntime = realRuntime): Promise<ModelDraftInput> {
  const parent = opts.parent ?? null;
  if (opts.referenceParent && !parent) throw new EdgefleetError('EF_UNKNOWN_MODEL', `--reference parent: ${opts.name} has no parent version to copy from`);
  const signature = opts.signature ? readJson(SignatureFile, opts.signature, 'signature') : await runtime.describe(files);
  const golden = opts.goldenInputs ? readJson(GoldenInputsFile, opts.goldenInputs, 'golden inputs') : null;
  const baselineInputs = opts.baselineInputs ? readJson(BaselineInputsFile, opts.baselineInputs, 'baseline inputs') : null;
  const health = opts.health ? readJson(HealthPolicy, opts.health, 'health policy') : HealthPolicy.parse({});
  const lineageExtra = opts.lineage ? readJson(Lineage.partial(), opts.lineage, 'lineage') : {};
  const training = opts.training ? readJson(TrainingSpec, opts.training, 'training') : undefined;
  const tolerance = {
    abs: golden?.tolerance?.abs ?? parent?.manifest.golden.tolerance.abs ?? 1e-4,
    rel: golden?.tolerance?.rel ?? parent?.manifest.golden.tolerance.rel ?? 1e-3,
  };
  const parsed = Manifest.safeParse({
    schema: 1,
    name: opts.name,
    version: opts.version ?? 1,
    runtime: files.runtime,
    entry: files.entry,
    files: files.files,
    inputs: signature.inputs,
    outputs: signature.outputs,
    health,
    ...(training ? { training } : {}),
    createdAt: 0,
    expiresAt: null,
  });
  if (!parsed.success) throw new EdgefleetError('EF_MODEL_INVALID', summarizeIssues(parsed.error.issues));
  const manifest = parsed.data;

  const model = await runtime.load(manifest, files.dir);
  try {
    const vectors: GoldenVector[] = opts.referenceParent && parent ? [...parent.manifest.golden.vectors] : [];
    for (const [i, v] of (golden?.vectors ?? []).entries()) {
      if (v.outputs) {
        vectors.push({ inputs: v.inputs, outputs: v.outputs });
        continue;
      }
      const out = await model.run(inputsOf(manifest, v.inputs, `golden vector ${i}`));
      vectors.push({ inputs: v.inputs, outputs: Object.fromEntries(Object.entries(out).map(([n, t]) => [n, tensorToJson(t)])) });
    }
    const withGolden: Manifest = { ...manifest, golden: { tolerance, vectors } };
    const report = await runGolden(model, withGolden);
    if (!report.ok) {
      const lines = report.failures.slice(0, 5).map((f) => `vector ${f.vector}${f.output ? ` output ${f.output}` : ''}: ${f.message}`);
      throw new EdgefleetError('EF_GOLDEN_MISMATCH', `the model does not reproduce its expected outputs:\n  ${lines.join('\n  ')}`, { details: report.failures });
    }
    let baseline: Baseline = baselineInputs ? await baselineOf(model, manifest, baselineInputs.vectors) : { inputs: {}, outputs: {} };
    if (opts.referenceParent && parent) {
      baseline = { inputs: baselineInputs ? baseline.inputs : parent.manifest.baseline.inputs, outputs: parent.manifest.baseline.outputs };
    }
    return {
      schema: 1,
      name: opts.name,
      ...(opts.version === undefined ? {} : { version: opts.version }),
      runtime: files.runtime,
      entry: files.entry,
      files: files.files,
      inputs: manifest.inputs,
      outputs: manifest.outputs,
      golden: { tolerance, vectors },
      health,
      baseline,
      ...(training ? { training } : {}),
      lineage: { ...lineageExtra, parent: parent?.manifest.version ?? lineageExtra.parent ?? null, method: lineageExtra.method ?? 'upload' },
      expiresAt: opts.expiresAt ?? null,
    };
  } finally {
    await model.dispose();
  }
}
