/**
 * SIGKILL the agent at random moments during enqueue and replay, restart the fleet server mid-replay:
 * every record the agent committed reaches the fleet, once. The loop is scripts/outbox-crash.ts;
 * CI runs a few iterations, `npm run soak:outbox -- --iterations 200` many.
 */
import { describe, expect, it } from 'vitest';
import { crashLoop } from '../../scripts/outbox-crash.js';

describe('outbox under SIGKILL and fleet restarts', () => {
  it('loses nothing the agent committed and stores nothing twice', async () => {
    const seed = Number(process.env.EDGEFLEET_CRASH_SEED ?? Date.now() % 100_000);
    let result = await crashLoop({ iterations: 6, restartFleetEvery: 3, recordsPerRun: 20_000, seed });
    // Deduplication must have been exercised, not merely present: keep going until a duplicate crossed the wire.
    for (let extra = 0; result.duplicatesDropped === 0 && extra < 3; extra++) {
      result = await crashLoop({ iterations: 6, restartFleetEvery: 2, recordsPerRun: 20_000, seed: seed + extra + 1 });
    }
    expect(result.missing, `seed ${seed}`).toEqual([]);
    expect(result.kills).toBeGreaterThan(0);
    // The loop did real work (how much depends on the machine's load: it is not a speed figure).
    expect(result.committed).toBeGreaterThan(100);
    expect(result.stored).toBeGreaterThanOrEqual(result.committed);
    expect(result.duplicatesDropped, `seed ${seed}`).toBeGreaterThan(0);
  }, 180_000);
});
