/**
 * The embedded broker's own guarantees, beyond authorization (see authz.test.ts): messages reach a
 * persistent subscriber whatever order the persistence finishes storing them in.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { topics } from '../../proto/index.js';
import { addDevice, addFleetIdentity, cleanup, rawClient, startFleet, waitFor } from '../helpers/fleet.js';

describe('embedded broker delivery', () => {
  afterAll(cleanup);

  it('delivers a retained message that a later message overtook to a persistent subscriber', async () => {
    const fleet = await startFleet({ kind: 'embedded' });
    const url = fleet.server.brokerUrl;
    const { password } = addFleetIdentity(fleet, 'watcher');
    const watcher = await rawClient(url, { clientId: 'watcher', username: 'watcher', password, clean: false });
    const seen = new Set<string>();
    watcher.on('message', (_t, payload) => seen.add(payload.toString()));
    await watcher.subscribeAsync(topics.fleetUpFilter, { qos: 1 });
    const a = await addDevice(fleet, 'dev-a');
    const b = await addDevice(fleet, 'dev-b');
    const devA = await rawClient(url, { clientId: 'dev-a', username: 'dev-a', password: a.password });
    const devB = await rawClient(url, { clientId: 'dev-b', username: 'dev-b', password: b.password });
    const rounds = 40;
    for (let i = 0; i < rounds; i++) {
      // A retained message waits for LevelDB before it is forwarded; the plain one right behind it does not.
      await Promise.all([
        devA.publishAsync(topics.up('dev-a', 'status'), `a${i}`, { qos: 1, retain: true }),
        devB.publishAsync(topics.up('dev-b', 'facts'), `b${i}`, { qos: 1 }),
      ]);
    }
    await waitFor(`all ${2 * rounds} messages delivered`, () => seen.size === 2 * rounds, 5000).catch(() => undefined);
    const missing = Array.from({ length: rounds }, (_, i) => [`a${i}`, `b${i}`]).flat().filter((m) => !seen.has(m));
    expect(missing).toEqual([]);
  });
});
