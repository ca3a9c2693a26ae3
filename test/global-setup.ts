import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';

/**
 * Compiles dist/ so that tests which spawn the executables never run stale code. tsc emits even
 * when it finds type errors; those are `npm run check`'s business, so a type error elsewhere in
 * the tree does not stop the tests from running.
 */
export default function setup(): void {
  const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
  try {
    execFileSync(process.execPath, [tsc, '-p', 'tsconfig.build.json'], { stdio: 'inherit' });
  } catch {
    process.stderr.write('global-setup: tsc reported errors (see above); dist/ was emitted anyway\n');
  }
}
