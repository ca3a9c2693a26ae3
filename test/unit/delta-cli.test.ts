/** `edgefleet delta create | apply | info` as a user runs them: the built CLI in a child process. */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { EXIT } from '../../proto/index.js';

const CLI = resolve('dist/scripts/cli.js');
const V5 = resolve('node_modules/@ricky0123/vad-web/dist/silero_vad_v5.onnx');
const V6 = resolve('node_modules/@ricky0123/vad-web/dist/silero_vad_v6.onnx');
const dir = mkdtempSync(join(tmpdir(), 'ef-delta-cli-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function cli(...args: string[]): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 60_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('edgefleet delta', () => {
  it('create prints sizes and codecs per section; apply reproduces the target exactly', () => {
    const patch = join(dir, 'v5-v6.efdp');
    const c = cli('delta', 'create', '--base', V5, '--target', V6, '--out', patch, '--json');
    expect(c.code, c.stderr).toBe(0);
    const made = JSON.parse(c.stdout) as { patchBytes: number; layout: string; sections: { codec: string; frames: number }[] };
    expect(made.layout).toBe('onnx');
    expect(made.patchBytes).toBe(readFileSync(patch).length);
    expect(made.sections.map((s) => s.codec)).toContain('tensor-planes');
    const human = cli('delta', 'create', '--base', V5, '--target', V6, '--out', patch);
    expect(human.stdout).toMatch(/sections:\n {2}copy/);

    const out = join(dir, 'v6.onnx');
    const a = cli('delta', 'apply', '--base', V5, '--patch', patch, '--out', out);
    expect(a.code, a.stderr).toBe(0);
    expect(readFileSync(out).equals(readFileSync(V6))).toBe(true);
    expect(cli('delta', 'info', patch).stdout).toMatch(/target +[0-9a-f]{64} \(2\.33 MB\)/);
  });

  it('apply writes nothing and exits non-zero for a wrong base or a damaged patch', () => {
    const patch = join(dir, 'p.efdp');
    expect(cli('delta', 'create', '--base', V5, '--target', V6, '--out', patch).code).toBe(0);
    const out = join(dir, 'never.onnx');
    const wrong = cli('delta', 'apply', '--base', V6, '--patch', patch, '--out', out);
    expect(wrong.code).toBe(EXIT.CLI_INVALID);
    expect(wrong.stderr).toMatch(/EF_DELTA_WRONG_BASE/);
    const bytes = readFileSync(patch);
    bytes[bytes.length >> 1]! ^= 1;
    writeFileSync(patch, bytes);
    const bad = cli('delta', 'apply', '--base', V5, '--patch', patch, '--out', out);
    expect(bad.code).toBe(EXIT.CLI_INVALID);
    expect(bad.stderr).toMatch(/EF_DELTA_(CORRUPT|TARGET_MISMATCH)/);
    expect(existsSync(out)).toBe(false);
    expect(readdirSync(dir).filter((f) => f.endsWith('.tmp'))).toEqual([]);
    expect(cli('delta', 'apply', '--patch', patch).code).toBe(EXIT.USAGE);
  });

  it('reads TF.js weights with the model.json beside them; without a base it makes an image', () => {
    const tf = mkdtempSync(join(dir, 'tfjs-'));
    const n = 4096;
    const w = Buffer.alloc(n * 4);
    for (let i = 0; i < n; i++) w.writeFloatLE(Math.sin(i) * 0.05, i * 4);
    writeFileSync(join(tf, 'group1-shard1of1.bin'), w);
    writeFileSync(join(tf, 'model.json'), JSON.stringify({ weightsManifest: [{ paths: ['group1-shard1of1.bin'], weights: [{ name: 'dense/kernel', shape: [64, 64], dtype: 'float32' }] }] }));
    const img = join(dir, 'img.efdp');
    const c = cli('delta', 'create', '--target', join(tf, 'group1-shard1of1.bin'), '--out', img, '--json');
    expect(c.code, c.stderr).toBe(0);
    expect(JSON.parse(c.stdout)).toMatchObject({ layout: 'tfjs', tensors: 1, baseBytes: 0 });
    const out = join(dir, 'w.bin');
    expect(cli('delta', 'apply', '--patch', img, '--out', out).code).toBe(0);
    expect(readFileSync(out).equals(w)).toBe(true);
  });
});
