/** bench:delta: the model pairs: tensor helpers, simulated fine-tunes of real ONNX files, and the trained digit models. */
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type * as Tfjs from '@tensorflow/tfjs';
import { type TensorRange } from '../../common/delta/index.js';
import { loadTf } from '../../agent/runtime/backends.js';
import { dirLoadHandler, disposeTfModel, saveLayersModelToDir } from '../../agent/runtime/tfjs.js';
import { accuracy, buildDigitsModel, loadDigits, mulberry32, trainDigits, type DigitSet, type TrainOptions } from '../train-digits.js';
import { CALIBRATION_TOLERANCE, FINETUNES, ONNX_HEAD, log, now } from './delta-tools.js';

/** |t − b| / |b| of every f32/f64 element with b ≠ 0, in the ranges given (same offsets in both). */
export function relChanges(base: Uint8Array, target: Uint8Array, ranges: Pick<TensorRange, 'offset' | 'length' | 'float'>[]): Float64Array {
  const out: number[] = [];
  const bv = new DataView(base.buffer, base.byteOffset, base.byteLength);
  const tv = new DataView(target.buffer, target.byteOffset, target.byteLength);
  for (const r of ranges) {
    const w = r.float === 'f32' ? 4 : r.float === 'f64' ? 8 : 0;
    if (w === 0 || r.offset + r.length > base.length || r.offset + r.length > target.length) continue;
    for (let at = r.offset; at + w <= r.offset + r.length; at += w) {
      const b = w === 4 ? bv.getFloat32(at, true) : bv.getFloat64(at, true);
      const t = w === 4 ? tv.getFloat32(at, true) : tv.getFloat64(at, true);
      if (b !== 0 && Number.isFinite(b) && Number.isFinite(t)) out.push(Math.abs(t - b) / Math.abs(b));
    }
  }
  return Float64Array.from(out);
}

export function median(xs: Float64Array): number | null {
  if (xs.length === 0) return null;
  const s = xs.slice().sort();
  return s.length % 2 ? s[s.length >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}

/** The tensors of `target` whose bytes differ from the base tensor of the same name (or have none). */
export function changedRanges(base: Uint8Array, baseRanges: TensorRange[], target: Uint8Array, targetRanges: TensorRange[]): TensorRange[] {
  const byName = new Map(baseRanges.map((r) => [r.name, r]));
  return targetRanges.filter((r) => {
    const b = byName.get(r.name);
    return !b || b.length !== r.length || Buffer.compare(base.subarray(b.offset, b.offset + b.length), target.subarray(r.offset, r.offset + r.length)) !== 0;
  });
}

/**
 * The name an ONNX file gives a tensor, for choosing the final layer: layoutOf's path when it
 * carries the parameter name, else the TensorProto's own `name`. Exporters (PyTorch here) store
 * weights as Constant nodes whose TensorProto names the parameter (`decoder.decoder.2.weight`),
 * while layoutOf calls them by position (`Constant[13].value`). Protobuf writes fields in number
 * order, so a name (field 8) sits right before raw_data (field 9): 0x42 len name 0x4a len data.
 */
export function onnxTensorName(file: Uint8Array, r: TensorRange): string {
  if (ONNX_HEAD.test(r.name)) return r.name;
  let lenBytes = 1;
  for (let n = r.length; n >= 0x80; n = Math.floor(n / 0x80)) lenBytes++;
  const tag = r.offset - lenBytes - 1;
  if (file[tag] !== 0x4a) return r.name;
  for (let len = 1; len < 0x80 && tag - len - 2 >= 0; len++) {
    if (file[tag - len - 1] !== len || file[tag - len - 2] !== 0x42) continue;
    const name = Buffer.from(file.subarray(tag - len, tag)).toString('latin1');
    if (/^[\x21-\x7e]+$/.test(name)) return name;
  }
  return r.name;
}

/**
 * Each element of the chosen float tensors times (1 + N(0,1)·m), in place in a copy: a fine-tune
 * of a given relative size on a real file. f16/bf16 tensors are left alone and listed.
 */
export function perturb(bytes: Uint8Array, ranges: TensorRange[], m: number, seed: number): { out: Uint8Array; touched: string[]; skipped: string[] } {
  const out = Uint8Array.from(bytes);
  const view = new DataView(out.buffer);
  const rand = mulberry32(seed);
  // Box–Muller; 1 − u keeps the logarithm finite.
  const normal = (): number => Math.sqrt(-2 * Math.log(1 - rand())) * Math.cos(2 * Math.PI * rand());
  const touched: string[] = [];
  const skipped: string[] = [];
  for (const r of ranges) {
    if (r.float !== 'f32' && r.float !== 'f64') {
      if (r.float) skipped.push(r.name);
      continue;
    }
    touched.push(r.name);
    const w = r.float === 'f32' ? 4 : 8;
    for (let at = r.offset; at + w <= r.offset + r.length; at += w) {
      if (w === 4) view.setFloat32(at, view.getFloat32(at, true) * (1 + normal() * m), true);
      else view.setFloat64(at, view.getFloat64(at, true) * (1 + normal() * m), true);
    }
  }
  return { out, touched, skipped };
}

// ---------------------------------------------------------------------------------------------
// TF.js training, cached

export interface Settings {
  samples: number;
  epochs: number;
  batchSize: number;
  clientSamples: number;
  fineTuneEpochs: number;
  fineTuneBatchSize: number;
  headLearningRate: number;
  attempts: number;
}

export const SETTINGS: Record<'full' | 'quick', Settings> = {
  full: { samples: 8000, epochs: 3, batchSize: 64, clientSamples: 2000, fineTuneEpochs: 1, fineTuneBatchSize: 32, headLearningRate: 1e-3, attempts: 4 },
  quick: { samples: 2000, epochs: 1, batchSize: 64, clientSamples: 500, fineTuneEpochs: 1, fineTuneBatchSize: 32, headLearningRate: 1e-3, attempts: 2 },
};

export interface TrainedModel {
  what: string;
  trainMs: number;
  testAccuracy: number;
  /** Over every weight, against the base; null for the base. */
  medianRelChange: number | null;
  learningRate: number;
  attempts?: number;
}

export interface TrainedSet {
  settings: Settings;
  models: Record<string, TrainedModel>;
  totalTrainMs: number;
}

export function weightsOf(model: Tfjs.LayersModel): Uint8Array {
  const parts = model.weights.map((w) => w.read().dataSync() as Float32Array);
  const all = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    all.set(p, at);
    at += p.length;
  }
  return new Uint8Array(all.buffer);
}

export async function trainModels(dir: string, s: Settings): Promise<TrainedSet> {
  const { tf } = await loadTf();
  const test = loadDigits({ split: 'test' });
  // A client's local data for the fine-tunes: other rows first, in another order.
  const client = loadDigits({ split: 'train', limit: s.clientSamples, seed: 100 });
  const models: Record<string, TrainedModel> = {};
  const started = now();

  const fromScratch = async (name: string, seed: number): Promise<void> => {
    const train = loadDigits({ split: 'train', limit: s.samples, seed });
    const model = await buildDigitsModel({ seed });
    const fit = await trainDigits(model, train, { epochs: s.epochs, learningRate: 1e-3, optimizer: 'adam', batchSize: s.batchSize });
    await saveLayersModelToDir(model, join(dir, name));
    models[name] = { what: `seed ${seed}, ${s.epochs} epochs on ${train.count} rows, Adam 1e-3`, trainMs: fit.ms, testAccuracy: await accuracy(model, test), medianRelChange: null, learningRate: 1e-3 };
    disposeTfModel(model);
    log(`  ${name}: ${(fit.ms / 1000).toFixed(1)} s, test accuracy ${models[name].testAccuracy.toFixed(4)}`);
  };
  await fromScratch('base', 1);
  await fromScratch('retrain', 2);

  const loadBase = (): Promise<Tfjs.LayersModel> => tf.loadLayersModel(dirLoadHandler(tf, join(dir, 'base')));
  const base = await loadBase();
  const baseWeights = weightsOf(base);
  disposeTfModel(base);
  const all = [{ offset: 0, length: baseWeights.length, float: 'f32' as const }];

  const fineTune = async (data: DigitSet, opts: TrainOptions): Promise<{ model: Tfjs.LayersModel; ms: number; rel: number }> => {
    const model = await loadBase();
    const fit = await trainDigits(model, data, opts);
    return { model, ms: fit.ms, rel: median(relChanges(baseWeights, weightsOf(model), all)) ?? 0 };
  };
  const save = async (name: string, what: string, r: { model: Tfjs.LayersModel; ms: number; rel: number }, lr: number, attempts?: number): Promise<void> => {
    await saveLayersModelToDir(r.model, join(dir, name));
    models[name] = { what, trainMs: r.ms, testAccuracy: await accuracy(r.model, test), medianRelChange: r.rel, learningRate: lr, ...(attempts ? { attempts } : {}) };
    disposeTfModel(r.model);
    log(`  ${name}: median |Δw|/|w| ${r.rel.toExponential(2)}, lr ${lr.toExponential(2)}, ${(r.ms / 1000).toFixed(1)} s, test accuracy ${models[name].testAccuracy.toFixed(4)}`);
  };

  // Adam moves every weight with a gradient by about lr per step, so the change scales with lr:
  // each attempt rescales lr by target / measured, and the next target starts from the last ratio.
  let lrPerChange = 2e-3;
  for (const [label, target] of FINETUNES) {
    let lr = target * lrPerChange;
    let best: { r: Awaited<ReturnType<typeof fineTune>>; lr: number } | null = null;
    let attempts = 0;
    while (attempts < s.attempts) {
      attempts++;
      const r = await fineTune(client, { epochs: s.fineTuneEpochs, learningRate: lr, optimizer: 'adam', batchSize: s.fineTuneBatchSize });
      const off = (x: number): number => Math.abs(Math.log(x / target));
      if (!best || off(r.rel) < off(best.r.rel)) {
        if (best) disposeTfModel(best.r.model);
        best = { r, lr };
      } else disposeTfModel(r.model);
      log(`  finetune-${label} attempt ${attempts}: lr ${lr.toExponential(2)} → median |Δw|/|w| ${r.rel.toExponential(2)}`);
      if (r.rel > 0) lrPerChange = lr / r.rel;
      if (off(r.rel) <= Math.log(CALIBRATION_TOLERANCE)) break;
      lr = target * lrPerChange;
    }
    const what = `base fine-tuned, all weights, Adam lr ${best!.lr.toExponential(2)}, ${s.fineTuneEpochs} epoch on ${client.count} client rows`;
    await save(`finetune-${label}`, what, best!.r, best!.lr, attempts);
  }
  const head = await fineTune(client, { epochs: s.fineTuneEpochs, learningRate: s.headLearningRate, optimizer: 'adam', batchSize: s.fineTuneBatchSize, trainableLayers: 'head' });
  await save('head', `base with only the softmax layer fine-tuned, Adam lr ${s.headLearningRate}, ${s.fineTuneEpochs} epoch on ${client.count} client rows`, head, s.headLearningRate);
  return { settings: s, models, totalTrainMs: now() - started };
}

/** The trained models for these settings, from the cache when it holds them. */
export async function trainedModels(s: Settings, retrain: boolean): Promise<{ dir: string; set: TrainedSet; cached: boolean }> {
  // The compiled training code is part of the key: changing how models train invalidates the cache.
  const code = readFileSync(fileURLToPath(new URL('../train-digits.js', import.meta.url)));
  const key = createHash('sha256').update(JSON.stringify({ s, FINETUNES, CALIBRATION_TOLERANCE })).update(code).digest('hex').slice(0, 12);
  const dir = join(tmpdir(), `edgefleet-bench-delta-${key}`);
  const meta = join(dir, 'meta.json');
  if (!retrain && existsSync(meta)) return { dir, set: JSON.parse(readFileSync(meta, 'utf8')) as TrainedSet, cached: true };
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  log(`training the digit models into ${dir}`);
  const set = await trainModels(dir, s);
  // Written last: its presence means every model directory is complete.
  writeFileSync(meta, JSON.stringify(set, null, 2));
  return { dir, set, cached: false };
}

// ---------------------------------------------------------------------------------------------
// Measuring one pair

