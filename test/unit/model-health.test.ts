import { describe, expect, it } from 'vitest';
import type { HealthPolicy} from '../../proto/index.js';
import { Manifest, type ManifestInput } from '../../proto/index.js';
import { judge, psi, VersionStats } from '../../agent/models/health.js';
import { canTransition, ON_RESTART, SLOT_STATES, TRANSITIONS } from '../../agent/models/lifecycle.js';
import type { TensorMap } from '../../agent/runtime/types.js';

const SHA = 'a'.repeat(64);

function manifest(health: Partial<HealthPolicy> = {}): Manifest {
  const input: ManifestInput = {
    schema: 1,
    name: 'iris',
    version: 1,
    runtime: 'tfjs-layers',
    entry: 'model.json',
    files: [{ path: 'model.json', sha256: SHA, size: 1 }],
    inputs: [{ name: 'features', dtype: 'float32', shape: [-1, 4] }],
    outputs: [{ name: 'probabilities', dtype: 'float32', shape: [-1, 3] }],
    health: { probationRequests: 50, confidenceOutput: 'probabilities', ...health },
    baseline: { outputs: { probabilities: { edges: [0, 0.25, 0.5, 0.75, 1], probs: [0.66, 0.005, 0.005, 0.33] } } },
    createdAt: 0,
    expiresAt: null,
  };
  return Manifest.parse(input);
}

function out(...p: number[]): TensorMap {
  return { probabilities: { dtype: 'float32', shape: [1, 3], data: Float32Array.from(p) } };
}

describe('model health checks', () => {
  it('passes a version that behaves like its baseline', () => {
    const m = manifest();
    const s = new VersionStats(m, 0);
    for (let i = 0; i < 100; i++) s.observe(1 + (i % 5) * 0.1, i % 3 === 0 ? out(0.9, 0.05, 0.05) : out(0.05, 0.9, 0.05));
    const v = judge(m.health, s, null, true, 0);
    expect(v.failures).toEqual([]);
    expect(v.figures?.requests).toBe(100);
    expect(v.figures?.p95Ms).toBeGreaterThan(1);
  });

  it('fails at once on the first non-finite output when the budget is zero', () => {
    const m = manifest();
    const s = new VersionStats(m, 0);
    s.observe(1, out(0.2, 0.3, 0.5));
    s.observe(1, out(Number.NaN, 0.3, 0.5));
    const v = judge(m.health, s, null, false, 0);
    expect(v.failures.map((f) => f.check)).toEqual(['nan']);
  });

  it('fails a skewed output distribution on PSI', () => {
    const m = manifest();
    const s = new VersionStats(m, 0);
    for (let i = 0; i < 100; i++) s.observe(1, out(0.4, 0.4, 0.45));
    const v = judge(m.health, s, null, true, 0);
    expect(v.failures.map((f) => f.check)).toContain('psi');
    expect(v.figures?.psi.probabilities).toBeGreaterThan(0.25);
  });

  it('fails on latency against the budget and against the previous version', () => {
    const m = manifest({ latencyP95Ms: 5 });
    const prev = new VersionStats(m, 0);
    const cur = new VersionStats(m, 0);
    for (let i = 0; i < 100; i++) {
      prev.observe(1, out(0.9, 0.05, 0.05));
      cur.observe(8, out(0.9, 0.05, 0.05));
    }
    const checks = judge(m.health, cur, prev, true, 0).failures.map((f) => f.check);
    expect(checks).toContain('latency');
    expect(checks).toContain('latency-vs-previous');
  });

  it('fails on memory growth, error rate and low confidence', () => {
    const m = manifest({ minMeanConfidence: 0.8, errorRateMax: 0.1 });
    const s = new VersionStats(m, 0);
    for (let i = 0; i < 60; i++) s.observe(1, out(0.5, 0.3, 0.2));
    for (let i = 0; i < 20; i++) s.error();
    const v = judge(m.health, s, null, true, 200 * 1024 * 1024);
    expect(v.failures.map((f) => f.check).sort()).toEqual(['confidence', 'errors', 'memory', 'psi'].sort());
  });

  it('PSI is zero for identical distributions and grows with shift', () => {
    const h = { edges: [0, 1, 2], probs: [0.5, 0.5] };
    expect(psi(h, [50, 50], 100)).toBeCloseTo(0, 10);
    expect(psi(h, [90, 10], 100)).toBeGreaterThan(psi(h, [60, 40], 100));
  });
});

describe('model slot lifecycle table', () => {
  it('names a restart action and at least one way out for every state', () => {
    for (const s of SLOT_STATES) {
      expect(ON_RESTART[s]).toBeDefined();
      expect(TRANSITIONS[s].length).toBeGreaterThan(0);
    }
  });

  it('never activates without passing verification and staging', () => {
    expect(canTransition('downloading', 'activating')).toBe(false);
    expect(canTransition('verifying', 'activating')).toBe(false);
    expect(canTransition('staging', 'activating')).toBe(true);
    expect(canTransition('probation', 'idle')).toBe(false);
    expect(ON_RESTART.probation).toBe('roll-back');
    expect(ON_RESTART.activating).toBe('roll-back');
  });
});
