import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';

/** Compiles dist/ so that tests which spawn the executables never run stale code. */
export default function setup(): void {
  const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
  execFileSync(process.execPath, [tsc, '-p', 'tsconfig.build.json'], { stdio: 'inherit' });
}
