#!/usr/bin/env node
/**
 * Load generator for the agent's outbox: runs a real agent (its config file, its state directory,
 * its broker link) and reports records through it as fast as asked, printing `c <seq>` for every
 * record once it is committed. Crash loops kill it at random moments and check that every printed
 * record reached the fleet exactly once (scripts/outbox-crash.ts, test/integration/outbox-crash.test.ts).
 *
 *   node dist/scripts/outbox-load.js --config agent.json [--count 10000] [--rate 5000] [--drain]
 *
 * --count  records to report (default 0); --rate records per second (default 5000);
 * --drain  after reporting, wait until the outbox is empty, print `drained`, and exit.
 * Prints `ready` once the agent has started.
 */
import { parseArgs } from 'node:util';
import { loadConfig } from '../common/config.js';
import { silentLogger } from '../common/log.js';
import { AgentConfig } from '../agent/config.js';
import { Agent } from '../agent/agent.js';

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: { config: { type: 'string' }, count: { type: 'string' }, rate: { type: 'string' }, drain: { type: 'boolean' } },
    strict: true,
  });
  const loaded = loadConfig({ schema: AgentConfig, file: values.config, envPrefix: 'EDGEFLEET_AGENT', overrides: { 'runtimes.probe': false } });
  if (!loaded.ok) {
    process.stderr.write(loaded.errors.join('\n') + '\n');
    return 2;
  }
  const count = Number(values.count ?? 0);
  const rate = Number(values.rate ?? 5000);
  const agent = new Agent(loaded.config, silentLogger());
  await agent.start();
  process.stdout.write('ready\n');
  const out: string[] = [];
  const flushOut = (): void => {
    if (out.length > 0) process.stdout.write(out.splice(0).join(''));
  };
  const tick = 10;
  const perTick = Math.max(1, Math.round((rate * tick) / 1000));
  let sent = 0;
  while (sent < count) {
    const n = Math.min(perTick, count - sent);
    const seqs = await Promise.all(
      Array.from({ length: n }, (_, i) => agent.report(i % 5 === 0 ? 'event' : 'metric', 'load', { i: sent + i, pad: 'x'.repeat(64) })),
    );
    for (const s of seqs) out.push(`c ${s}\n`);
    flushOut();
    sent += n;
    await new Promise((r) => setTimeout(r, tick));
  }
  if (values.drain) {
    while (agent.outbox.backlog().records > 0 || !agent.connected) await new Promise((r) => setTimeout(r, 50));
    process.stdout.write('drained\n');
  }
  await agent.stop();
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`outbox-load: ${(err as Error).stack ?? String(err)}\n`);
    process.exit(1);
  },
);
