/**
 * SIGKILL the agent at random points of the model lifecycle (downloading, verifying, staging in
 * the child process, activating, probation, committing, rolling back): after every restart it
 * serves a version whose signed manifest verifies with the fleet key and whose files in its store
 * hash to that manifest, one the device holds as stable (or is probating), never a partial file,
 * never one it marked failed. The loop is scripts/models-crash.ts, run here as the compiled
 * command (test/global-setup.ts builds dist/); CI runs a few iterations,
 * `npm run soak:models -- --iterations 300` many.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import type { ModelsCrashResult } from '../../scripts/models-crash.js';

type Printed = Omit<ModelsCrashResult, 'violations'> & { violations: number; violationsFirst: string[] };

const SCRIPT = join(fileURLToPath(import.meta.url), '..', '..', '..', 'dist', 'scripts', 'models-crash.js');

function runScript(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [SCRIPT, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

function lastJson(stdout: string): Printed | null {
  const last = stdout.trim().split('\n').at(-1);
  try {
    return last ? (JSON.parse(last) as Printed) : null;
  } catch {
    return null;
  }
}

describe('model lifecycle under SIGKILL', () => {
  it('serves a signed, intact, stable version after every restart', async () => {
    const seed = Number(process.env.EDGEFLEET_CRASH_SEED ?? Date.now() % 100_000);
    let run = await runScript(['--iterations', '6', '--seed', String(seed)]);
    let result = lastJson(run.stdout);
    // Kills must have landed in more than one lifecycle state, not merely been aimed there.
    for (let extra = 0; result !== null && result.violations === 0 && result.killStates < 2 && extra < 2; extra++) {
      run = await runScript(['--iterations', '4', '--seed', String(seed + extra + 1)]);
      result = lastJson(run.stdout);
    }
    const why = `seed ${seed}\n${run.stderr.slice(-4000)}`;
    expect(result, `the script printed no JSON as its last line: ${why}`).not.toBeNull();
    const r = result as Printed;
    expect(r.violationsFirst, why).toEqual([]);
    expect(r.violations, why).toBe(0);
    expect(run.code, why).toBe(0);
    expect(r.kills).toBeGreaterThanOrEqual(r.iterations);
    expect(r.killStates, why).toBeGreaterThanOrEqual(2);
    expect(r.checks).toBeGreaterThan(r.iterations);
    expect(r.filesVerified).toBeGreaterThan(0);
    expect(r.finalCommit, why).toBe(true);
  }, 170_000);
});
