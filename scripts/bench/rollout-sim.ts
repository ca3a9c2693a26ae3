/**
 * The simulated fleet of `bench:rollout`, in a process of its own (forked by scripts/bench/rollout.ts)
 * so it and the fleet server each get a core, as devices and fleet would. It starts the devices
 * the parent names, answers the raw echo beside the protocol, and says `ready`; the parent measures.
 */
import { SimFleet } from '../sim/fleet.js';

interface StartMessage {
  url: string;
  devices: number;
  prefix: string;
  initial: Record<string, number>;
}

async function main(): Promise<void> {
  const start = await new Promise<StartMessage>((resolve) => process.once('message', (m) => resolve(m as StartMessage)));
  const sim = new SimFleet({
    url: start.url,
    scenario: { devices: start.devices, prefix: start.prefix },
    initial: { models: start.initial },
    raw: true,
    connectConcurrency: 200,
    // The new version on probation is "applied and reported"; the commit 15 s later stays out of
    // the measured window (the parent waits for it before the next rollout, and aborts the second
    // rollout while its version is still on probation). No periodic reports in between.
    probationMs: 15_000,
    reportIntervalMs: 600_000,
    timing: { applyMs: [0, 0] },
  });
  // When devices applied a desired state (epoch ms), for the parent's BENCH_TRACE timeline.
  const applied: number[] = [];
  sim.on('applied', () => {
    if (applied.length < 1_000_000) applied.push(Date.now());
  });
  const t0 = performance.now();
  await sim.start();
  process.send?.({ ready: true, connectS: (performance.now() - t0) / 1000, rssMb: Math.round(process.memoryUsage.rss() / 2 ** 20) });
  process.on('message', (m: { stop?: boolean; cpu?: boolean; appliedSince?: number }) => {
    if (m.appliedSince !== undefined) {
      const since = m.appliedSince;
      const buckets: Record<string, number> = {};
      for (const t of applied) if (t >= since) buckets[String(Math.floor((t - since) / 250) * 250)] = (buckets[String(Math.floor((t - since) / 250) * 250)] ?? 0) + 1;
      process.send?.({ buckets });
    }
    // CPU seconds used so far: the parent reads it around each measured window.
    if (m.cpu) process.send?.({ cpuS: (process.cpuUsage().user + process.cpuUsage().system) / 1e6 });
    if (m.stop) {
      void sim
        .stop({ clearRetained: true })
        .catch(() => undefined)
        .finally(() => process.exit(0));
    }
  });
}

main().catch((err: unknown) => {
  process.stderr.write(`bench:rollout simulator: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
