import { fork } from 'node:child_process';
import type { Manifest } from '../../proto/index.js';
import { compiledEntry } from '../../common/compiled.js';

/**
 * Loads a candidate model and runs its golden vectors in a throwaway child process before the
 * agent loads it into itself. A model that crashes the runtime (a segfault in a native kernel, an
 * abort, memory it cannot get) then takes down the child, and the agent marks the version failed
 * instead of crash-looping on it.
 */

export type ChildCheckResult =
  | { ok: true; loadMs: number; runMs: number }
  | { ok: false; reason: 'crash' | 'timeout' | 'load' | 'golden'; detail: string };

/** What the parent sends the child over IPC. */
export interface ChildCheckRequest {
  manifest: Manifest;
  dir: string;
}

export interface ChildCheckOptions {
  /** From fork to the child's exit; the child is killed with SIGKILL when it runs over. */
  timeoutMs: number;
  /**
   * Extra environment for the child. Tests use it to set EDGEFLEET_CHILD_CHECK_TEST_HOOK (see
   * child-check-main.ts) and make the child abort or hang; nothing in the agent sets it.
   */
  env?: Record<string, string>;
}

/** How much of the child's stderr a crash report keeps (its end, where the reason is). */
const STDERR_TAIL_CHARS = 2000;

/** The child's entry point, compiled (common/compiled.ts). */
export function childEntry(): string {
  return compiledEntry(import.meta.url, './child-check-main.js');
}

function isResult(m: unknown): m is ChildCheckResult {
  if (typeof m !== 'object' || m === null) return false;
  const r = m as Record<string, unknown>;
  return r.ok === true ? typeof r.loadMs === 'number' && typeof r.runMs === 'number' : r.ok === false && typeof r.reason === 'string' && typeof r.detail === 'string';
}

/**
 * Resolves once the child has exited (or been killed), never rejects. Whatever the child reported
 * before exiting stands; exiting without a report is a crash.
 */
export function checkInChild(manifest: Manifest, dir: string, opts: ChildCheckOptions): Promise<ChildCheckResult> {
  return new Promise((resolvePromise) => {
    let entry: string;
    try {
      entry = childEntry();
    } catch (err) {
      resolvePromise({ ok: false, reason: 'crash', detail: (err as Error).message });
      return;
    }
    const child = fork(entry, [], {
      // Not the parent's: under vitest those are loader flags for TypeScript the child does not need.
      execArgv: [],
      env: { ...process.env, ...opts.env },
      stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
      serialization: 'json',
    });
    let stderr = '';
    let result: ChildCheckResult | null = null;
    let timedOut = false;
    let settled = false;
    const settle = (r: ChildCheckResult): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolvePromise(r);
    };
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, opts.timeoutMs);

    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (chunk: string) => {
      stderr = (stderr + chunk).slice(-STDERR_TAIL_CHARS);
    });
    child.on('message', (m: unknown) => {
      result ??= isResult(m) ? m : { ok: false, reason: 'crash', detail: 'the child sent a malformed report' };
    });
    child.on('error', (err) => {
      // Spawn failures; a failed send to a child that already died is reported by 'exit' instead.
      if (child.pid === undefined) settle({ ok: false, reason: 'crash', detail: `could not start the child: ${err.message}` });
    });
    // 'close', not 'exit': by then stderr has been read to the end, so a crash report has the reason.
    child.on('close', (code, signal) => {
      if (result) return settle(result);
      if (timedOut) return settle({ ok: false, reason: 'timeout', detail: `no report within ${opts.timeoutMs} ms; killed` });
      const how = signal ? `killed by ${signal}` : `exited with code ${code}`;
      settle({ ok: false, reason: 'crash', detail: `the child ${how} before reporting${stderr ? `; stderr: ${stderr.trim()}` : ''}` });
    });
    const request: ChildCheckRequest = { manifest, dir };
    child.send(request, () => undefined);
  });
}
