import type Database from 'better-sqlite3';
import { EdgefleetError, type Manifest, type TrainingSpec } from '../../proto/index.js';
import type { TensorData, TensorMap } from '../runtime/types.js';
import { featureSize, type SampleSet } from './samples.js';

/**
 * The device's labelled samples, in the `samples` table of the feedback database (agent/api/
 * feedback.ts opens it and migrates it). Written by labelled requests and the in-process API, read
 * by local training, never sent anywhere: nothing here publishes. An input is float32 LE bytes with
 * its row shape (no batch dimension), a label the JSON the application gave. Whether a row fits is
 * decided at load, against the model then: a model whose shape or loss changed skips what it can't use.
 */

export const MAX_LABEL_BYTES = 4096;
/** Values in one sample's input (4 MiB as float32): the cap JSON tensors have too. */
export const MAX_SAMPLE_VALUES = 1 << 20;
const MAX_RANK = 8;
const INT32_MAX = 2 ** 31 - 1;

export type SampleLoss = TrainingSpec['loss'];

/** The training input of one request, not yet copied: integer data is converted when it is. */
export interface SampleInput {
  data: Exclude<TensorData, BigInt64Array>;
  /** Without the batch dimension. */
  featureShape: number[];
}

export interface LoadSamplesOptions {
  /** The model's row shape (the training input's shape without the batch dimension); -1 matches any size. */
  featureShape: readonly number[];
  loss: SampleLoss;
  /** Targets per row for squared error. Default 1; ignored for cross-entropy. */
  labelWidth?: number;
  /** Cross-entropy only: class indices at or above this are skipped. Default: no check. */
  classes?: number;
  /** Samples returned at most, newest first. Default: all. */
  limit?: number;
}

export interface LoadedSamples {
  set: SampleSet;
  /** Each row's seq: stable for the sample's life, so splitHoldout keeps it on one side. */
  keys: Int32Array;
  /** Rows looked at and left out: another shape, a label that does not fit the loss, a damaged row. */
  skipped: number;
}

function prepare(db: Database.Database) {
  return {
    // A request labelled again keeps its seq (and so its side of the holdout split) and its ts;
    // the input follows the ring, which holds the newest request under a reused id.
    put: db.prepare<[string, string | null, Buffer, string, string, number]>(`
      INSERT INTO samples (model, request_id, input, feature_shape, label, ts) VALUES (?, ?, ?, ?, ?, ?)
      ON CONFLICT (model, request_id) DO UPDATE SET input = excluded.input, feature_shape = excluded.feature_shape, label = excluded.label`),
    relabel: db.prepare<[string, string, string]>('UPDATE samples SET label = ? WHERE model = ? AND request_id = ?'),
    withdraw: db.prepare<[string, string]>('DELETE FROM samples WHERE model = ? AND request_id = ?'),
    // As for labels: everything at or below the seq of the (M+1)-th newest row goes.
    trimCount: db.prepare<[string, string, number]>(`
      DELETE FROM samples WHERE model = ? AND seq <= (
        SELECT seq FROM samples WHERE model = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)`),
    trimAge: db.prepare<[string, number]>('DELETE FROM samples WHERE model = ? AND ts < ?'),
    purge: db.prepare<[number]>('DELETE FROM samples WHERE ts < ?'),
    count: db.prepare<[string, number], { n: number }>('SELECT COUNT(*) AS n FROM samples WHERE model = ? AND ts >= ?'),
    select: db.prepare<[string], { seq: number; input: Buffer; feature_shape: string; label: string }>('SELECT seq, input, feature_shape, label FROM samples WHERE model = ? ORDER BY seq DESC'),
  };
}

export class SampleTable {
  private readonly q: ReturnType<typeof prepare>;
  private readonly addTx: (model: string, blob: Buffer, shape: string, label: string) => number;

  constructor(
    db: Database.Database,
    /** clock: ms since the epoch. */
    private readonly bounds: { maxSamplesPerModel: number; maxSampleAgeSec: number; clock: () => number },
  ) {
    this.q = prepare(db);
    this.addTx = db.transaction((model: string, blob: Buffer, shape: string, label: string) => {
      // Request ids are never null, so a null one never conflicts: this is always an insert.
      const seq = Number(this.q.put.run(model, null, blob, shape, label, this.bounds.clock()).lastInsertRowid);
      this.trim(model);
      return seq;
    });
  }

  /** The oldest instant (ms) a sample may be stored at and still count. */
  private cutoff(): number {
    return this.bounds.clock() - this.bounds.maxSampleAgeSec * 1000;
  }

  /** Count bound then age bound; both range scans of one model's index. */
  private trim(model: string): void {
    this.q.trimCount.run(model, model, this.bounds.maxSamplesPerModel);
    this.q.trimAge.run(model, this.cutoff());
  }

  /** Drops expired samples of every model (at open: a model no longer labelled still ages out). */
  purgeExpired(): void {
    this.q.purge.run(this.cutoff());
  }

  /**
   * A labelled request becomes (or stays) a sample, in the caller's transaction beside the label.
   * Without its input (never held, or dropped from the ring since) an existing sample only takes
   * the new label; a label that fits no loss (a correction to "unknown", say) withdraws it.
   */
  putFromRequest(model: string, requestId: string, input: { data: Float32Array; featureShape: number[] } | undefined, label: string): void {
    if (!isTrainableLabel(JSON.parse(label) as unknown)) this.q.withdraw.run(model, requestId);
    else if (input === undefined) this.q.relabel.run(label, model, requestId);
    else {
      this.q.put.run(model, requestId, toBlob(input.data), JSON.stringify(input.featureShape), label, this.bounds.clock());
      this.trim(model);
    }
  }

  /**
   * Stores a sample from the in-process API; returns its seq. EF_INFER_INVALID for an input that
   * does not match its shape or holds NaN/±Infinity, EF_BAD_PAYLOAD for a label that is not JSON of
   * at most 4 KiB or fits no loss. Nothing is written when it throws.
   */
  add(model: string, input: Float32Array, featureShape: readonly number[], label: unknown): number {
    if (typeof model !== 'string' || model.length === 0 || model.length > 256) throw new EdgefleetError('EF_BAD_PAYLOAD', 'model must be a name of 1 to 256 characters', { details: { field: 'model' } });
    const n = shapeSize(featureShape);
    if (n < 1) throw badInput(`featureShape must be at most ${MAX_RANK} positive integers holding at most ${MAX_SAMPLE_VALUES} values`);
    if (!(input instanceof Float32Array)) throw badInput('the input must be a Float32Array');
    if (input.length !== n) throw badInput(`the input has ${input.length} values, the shape [${featureShape.join(',')}] holds ${n}`);
    const bad = firstNonFinite(input);
    if (bad >= 0) throw new EdgefleetError('EF_INFER_INVALID', `input: value at index ${bad} is ${input[bad]}`, { details: { field: 'input', index: bad } });
    const text = serialiseLabel(label);
    if (!isTrainableLabel(JSON.parse(text) as unknown)) {
      throw new EdgefleetError('EF_BAD_PAYLOAD', 'the label fits no loss: a class index (or {"class": n}), or finite numbers', { details: { field: 'label' } });
    }
    return this.addTx(model, toBlob(input), JSON.stringify(featureShape), text);
  }

  /** Samples of `model` stored within the age bound (an index range count). */
  count(model: string): number {
    return this.q.count.get(model, this.cutoff())?.n ?? 0;
  }

  /**
   * The newest samples of `model` as a SampleSet, with their seq as keys. Rows are filtered, never
   * thrown on: another feature shape (when `featureShape` has -1 dims the newest fitting row fixes
   * them), a label that does not fit the loss, a damaged row. `skipped` counts those among the rows
   * read, which stops at `limit` samples. Bad options are EF_TRAINING_FAILED.
   */
  load(model: string, opts: LoadSamplesOptions): LoadedSamples {
    const want = opts.featureShape;
    if (!Array.isArray(want) || want.length > MAX_RANK || !want.every((d) => Number.isSafeInteger(d) && (d === -1 || d >= 1))) {
      throw new EdgefleetError('EF_TRAINING_FAILED', 'featureShape must be at most 8 positive integers or -1');
    }
    const ce = opts.loss === 'sparse-categorical-crossentropy';
    const labelWidth = ce ? 1 : (opts.labelWidth ?? 1);
    if (!Number.isSafeInteger(labelWidth) || labelWidth < 1 || labelWidth > MAX_LABEL_BYTES) throw new EdgefleetError('EF_TRAINING_FAILED', 'labelWidth must be a positive integer');
    const limit = opts.limit === undefined ? Infinity : Math.max(0, Math.floor(opts.limit));
    const classes = opts.classes ?? Infinity;
    this.q.trimAge.run(model, this.cutoff());
    const blobs: Buffer[] = [];
    const seqs: number[] = [];
    const ys: (number | number[])[] = [];
    let shapeText: string | null = null;
    let shape: readonly number[] = want;
    let rowBytes = 0;
    let skipped = 0;
    for (const row of this.q.select.iterate(model)) {
      if (blobs.length >= limit) break;
      const y = parseLabel(parseJson(row.label), opts.loss, labelWidth);
      let fits = y !== null && !(typeof y === 'number' && y >= classes) && Buffer.isBuffer(row.input);
      // A blob of the wrong length is a damaged row (the shape was checked when it was written).
      if (fits && shapeText === null) {
        const s = parseJson(row.feature_shape) as number[];
        fits = shapeSize(s) > 0 && s.length === want.length && s.every((d, i) => want[i] === -1 || want[i] === d) && row.input.length === featureSize(s) * 4;
        if (fits) [shapeText, shape, rowBytes] = [row.feature_shape, s, featureSize(s) * 4];
      } else if (fits) fits = row.feature_shape === shapeText && row.input.length === rowBytes;
      if (!fits) {
        skipped++;
        continue;
      }
      blobs.push(row.input);
      seqs.push(row.seq);
      ys.push(y!);
    }
    const count = blobs.length;
    const f = featureSize(shape);
    const x = new Float32Array(count * f);
    for (let i = 0; i < count; i++) fromBlob(blobs[i]!, x, i * f);
    const y = ce ? Int32Array.from(ys as number[]) : new Float32Array(count * labelWidth);
    if (!ce) for (let i = 0; i < count; i++) y.set(ys[i] as number[], i * labelWidth);
    // seq is a rowid: it passes 2^31 only after two billion samples; past that the key wraps, and stays stable.
    return { set: { x, y, count, featureShape: shape.slice(), labelWidth }, keys: Int32Array.from(seqs), skipped };
  }
}

/**
 * A label as the loss reads it, or null when it does not fit. Cross-entropy: a non-negative
 * integer class index, as a number or `{"class": n}` (other keys ignored). Squared error: an array
 * of `labelWidth` numbers, or a number when `labelWidth` is 1, all finite as float32.
 */
export function parseLabel(label: unknown, loss: SampleLoss, labelWidth = 1): number | number[] | null {
  if (loss === 'sparse-categorical-crossentropy') {
    const c = typeof label === 'object' && label !== null && !Array.isArray(label) && Object.hasOwn(label, 'class') ? (label as { class: unknown }).class : label;
    return typeof c === 'number' && Number.isInteger(c) && c >= 0 && c <= INT32_MAX ? c : null;
  }
  const values: unknown[] = typeof label === 'number' && labelWidth === 1 ? [label] : Array.isArray(label) && label.length === labelWidth ? label : [];
  const out = values.map((v) => (typeof v === 'number' ? Math.fround(v) : NaN));
  return out.length > 0 && out.every(Number.isFinite) ? out : null;
}

/** True when a label fits some loss and width; others are kept as labels, never as samples. */
export function isTrainableLabel(label: unknown): boolean {
  const width = Array.isArray(label) ? label.length : 1;
  return parseLabel(label, 'sparse-categorical-crossentropy') !== null || parseLabel(label, 'mean-squared-error', width) !== null;
}

/** A stored JSON text, or undefined when it is damaged (the row is then skipped). */
function parseJson(text: string): unknown {
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return undefined;
  }
}

/** A label as stored: JSON of at most MAX_LABEL_BYTES, else EF_BAD_PAYLOAD. */
export function serialiseLabel(label: unknown): string {
  let text: string | undefined;
  try {
    text = JSON.stringify(label);
  } catch (err) {
    // A cycle or a bigint: not JSON.
    throw new EdgefleetError('EF_BAD_PAYLOAD', 'the label is not JSON', { cause: err, details: { field: 'label' } });
  }
  if (text === undefined) throw new EdgefleetError('EF_BAD_PAYLOAD', 'the label is not JSON', { details: { field: 'label' } });
  if (text.length > MAX_LABEL_BYTES || Buffer.byteLength(text) > MAX_LABEL_BYTES) {
    throw new EdgefleetError('EF_BAD_PAYLOAD', `the label exceeds ${MAX_LABEL_BYTES} bytes as JSON`, { details: { field: 'label' } });
  }
  return text;
}

/** The training input's row shape from the manifest (-1: any size), or null when the model does not train. */
export function trainingFeatureShape(manifest: Manifest): number[] | null {
  const t = manifest.training;
  if (t === undefined) return null;
  const spec = t.input === undefined ? manifest.inputs[0] : manifest.inputs.find((s) => s.name === t.input);
  return spec ? spec.shape.slice(1) : null;
}

/**
 * The training input of a validated request, for the feedback ring; undefined when the model does
 * not train, the input is int64 or bool (not features), or the request is a batch: a label names a
 * request, so only a batch of one row can say which row it labels.
 */
export function trainingInput(manifest: Manifest, inputs: TensorMap): SampleInput | undefined {
  const training = manifest.training;
  if (training === undefined) return undefined;
  const name = training.input ?? manifest.inputs[0]!.name;
  const t = Object.hasOwn(inputs, name) ? inputs[name] : undefined;
  if (t === undefined || t.dtype === 'int64' || t.dtype === 'bool' || t.shape.length < 1 || t.shape[0] !== 1) return undefined;
  return { data: t.data as SampleInput['data'], featureShape: t.shape.slice(1) };
}

function badInput(message: string): EdgefleetError {
  return new EdgefleetError('EF_INFER_INVALID', `input: ${message}`, { details: { field: 'input' } });
}

/** Values a row shape holds, or -1 when it is not at most 8 positive integers holding at most MAX_SAMPLE_VALUES. */
export function shapeSize(shape: unknown): number {
  if (!Array.isArray(shape) || shape.length > MAX_RANK) return -1;
  let n = 1;
  for (const d of shape as unknown[]) {
    if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 1) return -1;
    n *= d;
    if (n > MAX_SAMPLE_VALUES) return -1;
  }
  return n;
}

/** Index of the first NaN or ±Infinity, or -1. */
export function firstNonFinite(d: Float32Array): number {
  for (let i = 0; i < d.length; i++) if (!Number.isFinite(d[i]!)) return i;
  return -1;
}

// Stored little-endian whatever the host, so a database file moves between devices.
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

function toBlob(d: Float32Array): Buffer {
  if (LITTLE_ENDIAN) return Buffer.from(d.buffer, d.byteOffset, d.byteLength); // SQLite copies it on bind
  const b = Buffer.alloc(d.byteLength);
  for (let i = 0; i < d.length; i++) b.writeFloatLE(d[i]!, i * 4);
  return b;
}

function fromBlob(b: Buffer, into: Float32Array, offset: number): void {
  // Byte copy: a Buffer's offset in its pool need not be 4-aligned, so no Float32Array view of it.
  if (LITTLE_ENDIAN) new Uint8Array(into.buffer, into.byteOffset + offset * 4, b.length).set(b);
  else for (let i = 0; i < b.length / 4; i++) into[offset + i] = b.readFloatLE(i * 4);
}
