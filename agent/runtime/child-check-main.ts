import { performance } from 'node:perf_hooks';
import { EXIT, Manifest } from '../../proto/index.js';
import type { ChildCheckRequest, ChildCheckResult } from './child-check.js';
import { loadModel, runGolden } from './load.js';

/**
 * The child side of checkInChild: takes one {manifest, dir} over IPC, loads the model, runs its
 * golden vectors, reports, exits. It is a separate process so that whatever the runtime does to it
 * (abort, segfault, running out of memory) stays here.
 *
 * EDGEFLEET_CHILD_CHECK_TEST_HOOK is for tests only, to stand in for a model that kills its
 * runtime: `abort` calls process.abort() after loading, `hang` never reports. The agent never sets it.
 */

const hook = process.env.EDGEFLEET_CHILD_CHECK_TEST_HOOK;

function report(r: ChildCheckResult): void {
  process.send!(r, () => process.exit(EXIT.OK));
}

async function check(msg: unknown): Promise<void> {
  const req = msg as Partial<ChildCheckRequest> | null;
  const parsed = Manifest.safeParse(req?.manifest);
  if (!parsed.success || typeof req?.dir !== 'string') return report({ ok: false, reason: 'load', detail: 'the check request is not a {manifest, dir}' });
  const manifest = parsed.data;
  const t0 = performance.now();
  let model;
  try {
    model = await loadModel(manifest, req.dir);
  } catch (err) {
    return report({ ok: false, reason: 'load', detail: err instanceof Error ? err.message : String(err) });
  }
  const loadMs = performance.now() - t0;
  if (hook === 'abort') process.abort();
  if (hook === 'hang') return new Promise(() => undefined);
  const t1 = performance.now();
  const golden = await runGolden(model, manifest);
  const runMs = performance.now() - t1;
  await model.dispose();
  if (!golden.ok) {
    const detail = golden.failures.map((f) => `vector ${f.vector}${f.output === null ? '' : ` ${f.output}`}: ${f.message}`).join('; ');
    return report({ ok: false, reason: 'golden', detail });
  }
  report({ ok: true, loadMs, runMs });
}

if (!process.send) {
  process.stderr.write('child-check-main is started by checkInChild over IPC, not by hand\n');
  process.exit(EXIT.USAGE);
}
// The parent is gone: nobody is waiting for the answer.
process.on('disconnect', () => process.exit(EXIT.OK));
process.once('message', (msg: unknown) => {
  check(msg).catch((err: unknown) => report({ ok: false, reason: 'crash', detail: `the check threw: ${err instanceof Error ? err.message : String(err)}` }));
});
