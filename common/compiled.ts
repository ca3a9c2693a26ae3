import { existsSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { EdgefleetError } from '../proto/errors.js';

/** The project's root: this file is <root>/common/compiled.ts, or <root>/dist/common/compiled.js when built. */
const sourceRoot = fileURLToPath(new URL('..', import.meta.url));

/**
 * A module to start as a child process or a worker thread, as compiled JavaScript: node cannot run
 * the TypeScript source (no tsx or type stripping on Node 20). Run from dist/ it is the file beside
 * the caller; run from the source tree (vitest runs the .ts files) it is the compiled twin under
 * dist/, which test/global-setup.ts builds first.
 *
 * `from`: the caller's import.meta.url; `file`: the entry's path from the caller's directory (`./child-main.js`).
 */
export function compiledEntry(from: string, file: string): string {
  const sibling = fileURLToPath(new URL(file, from));
  if (existsSync(sibling)) return sibling;
  const built = join(sourceRoot, 'dist', relative(sourceRoot, sibling));
  if (existsSync(built)) return built;
  throw new EdgefleetError('EF_INTERNAL', `no compiled ${file} next to ${sibling} or at ${built}; run npm run build`);
}
