#!/usr/bin/env node
/**
 * Child process of `bench:delta`: applies one patch and reports the memory it took, in a process
 * that has done nothing else, so the figure is the decoder's and not the benchmark's.
 *
 *   node dist/scripts/bench/delta-apply.js <base|-> <patch> <out>
 *
 * Prints one JSON line: rss_before_bytes (process.memoryUsage().rss right before applying),
 * max_rss_bytes (process.resourceUsage().maxRSS after, which Node gives in KiB), vm_hwm_bytes
 * (VmHWM of /proc/self/status, the same peak counted for this address space only; null off Linux),
 * sha256, size. Start it from a small process: maxRSS includes the RSS the parent had at fork().
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { applyPatchFile } from '../../common/delta/index.js';

async function main(argv: string[]): Promise<void> {
  const [base, patch, out] = argv;
  if (!base || !patch || !out) throw new Error('usage: delta-apply <base|-> <patch> <out>');
  const rssBefore = process.memoryUsage().rss;
  const { sha256, size } = await applyPatchFile(base === '-' ? null : base, patch, out);
  const maxRss = process.resourceUsage().maxRSS * 1024;
  let hwm: number | null = null;
  try {
    const kib = /^VmHWM:\s+(\d+) kB/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1];
    hwm = kib === undefined ? null : Number(kib) * 1024;
  } catch {
    // Not Linux.
  }
  process.stdout.write(`${JSON.stringify({ rss_before_bytes: rssBefore, max_rss_bytes: maxRss, vm_hwm_bytes: hwm, sha256, size })}\n`);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
    process.exit(1);
  });
}
