/**
 * The outbox end to end, in process: records committed on the device reach the fleet's database
 * exactly once, survive a link that comes and goes, and are deleted on the device only when acked.
 */
import { writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { deflateRawSync } from 'node:zlib';
import { afterAll, describe, expect, it } from 'vitest';
import { BINARY_FRAME_MAGIC, FRAME_TELEMETRY_BATCH, encodeTelemetryBatch, topics } from '../../proto/index.js';
import { addDevice, addFleetIdentity, applied, cleanup, rawClient, startAgent, startFleet, tempDir, uniq, waitFor, type FleetHandle } from '../helpers/fleet.js';

async function fleetSide(fleet: FleetHandle): Promise<ReturnType<typeof rawClient>> {
  const { username, password } = addFleetIdentity(fleet, uniq('forger'));
  return rawClient(fleet.server.brokerUrl, { clientId: username, username, password });
}

describe('telemetry outbox', () => {
  afterAll(cleanup);

  it('delivers every committed record once, and empties the device outbox', async () => {
    const fleet = await startFleet({ kind: 'embedded' });
    const cred = await addDevice(fleet, 'dev-tel');
    const { agent } = await startAgent(cred);
    await applied(agent, 1);
    const seqs = await Promise.all(Array.from({ length: 2000 }, (_, i) => agent.report(i % 3 === 0 ? 'event' : 'metric', 'test', { i })));
    expect(new Set(seqs).size).toBe(2000);
    await waitFor('the device outbox drains', () => agent.outbox.backlog().records === 0, 20_000);
    const show = await fleet.admin.call('devices.show', { deviceId: 'dev-tel' });
    expect(show.telemetry?.lastSeq).toBe(Math.max(...seqs));
    const stored = fleet.server.fleetStore.telemetry.list('dev-tel', { limit: 100_000 });
    const storedSeqs = new Set(stored.map((r) => r.seq));
    for (const s of seqs) expect(storedSeqs.has(s)).toBe(true);
    expect(stored.some((r) => r.type === 'agent.started')).toBe(true);
    const listed = await fleet.admin.call('telemetry.list', { deviceId: 'dev-tel', limit: 5, cls: 'event' });
    expect(listed.records.map((r) => r.cls)).toEqual(['event', 'event', 'event', 'event', 'event']);
  });

  it('ignores acknowledgements that are malformed or name no batch in flight, and deletes nothing', async () => {
    const fleet = await startFleet({ kind: 'embedded' });
    const cred = await addDevice(fleet, 'dev-acks');
    const { agent } = await startAgent(cred);
    await applied(agent, 1);
    // Park the link so records stay in the outbox while forged acks arrive.
    await fleet.server.stop();
    const seqs = await Promise.all(Array.from({ length: 50 }, (_, i) => agent.report('event', 'kept', { i })));
    await fleet.restart();
    const forger2 = await fleetSide(fleet);
    const before = agent.rejectedCounts;
    const bad = [
      Buffer.from('not json'),
      Buffer.from(JSON.stringify({ batch: 'nope', ranges: [[1, 1e9]] })),
      Buffer.from(JSON.stringify({ batch: 'x', ranges: [[5, 1]] })),
      Buffer.from(JSON.stringify({ ranges: [[Math.min(...seqs), Math.max(...seqs)]] })),
    ];
    for (const payload of bad) await forger2.publishAsync(topics.down('dev-acks', 'ack'), payload, { qos: 1 });
    await waitFor('forged acks counted', () => Object.values(agent.rejectedCounts).reduce((a, b) => a + b, 0) >= Object.values(before).reduce((a, b) => a + b, 0) + bad.length);
    // The real records still arrive, because they were never deleted by a forged ack.
    await waitFor('records delivered', () => fleet.server.fleetStore.telemetry.list('dev-acks', { limit: 1000 }).filter((r) => r.type === 'kept').length === 50, 20_000);
  });

  it('refuses telemetry frames it cannot read, stores nothing of them, and counts them', async () => {
    const fleet = await startFleet({ kind: 'embedded' });
    const cred = await addDevice(fleet, 'dev-junk');
    const dev = await rawClient(fleet.server.brokerUrl, { clientId: 'dev-junk', username: 'dev-junk', password: cred.password });
    const header = Buffer.from([BINARY_FRAME_MAGIC, FRAME_TELEMETRY_BATCH, 1]);
    const frames = [
      Buffer.from('{"batch":"b","records":[]}'),
      Buffer.concat([header, Buffer.from('not deflated')]),
      Buffer.concat([header, deflateRawSync(Buffer.from('{"batch":"b","records":[{"seq":0}]}'))]),
      Buffer.concat([header, deflateRawSync(Buffer.alloc(20 * 1024 * 1024, 0x20))]), // inflates past the cap
      Buffer.from([BINARY_FRAME_MAGIC, FRAME_TELEMETRY_BATCH, 9, 0]),
      encodeTelemetryBatch({
        batch: 'dup-seq',
        records: [
          { seq: 1, cls: 'event', ts: 1, type: 't', body: 1 },
          { seq: 1, cls: 'event', ts: 1, type: 't', body: 2 },
        ],
        backlog: { records: 0, bytes: 0, oldestAgeSec: null, dropped: {} },
      }),
    ];
    for (const f of frames) await dev.publishAsync(topics.up('dev-junk', 'telemetry'), f, { qos: 1 });
    await waitFor('every frame refused', async () => (await fleet.admin.call('devices.show', { deviceId: 'dev-junk' })).rejectedMessages === frames.length);
    expect(fleet.server.fleetStore.telemetry.list('dev-junk', { limit: 10 })).toEqual([]);
    expect(fleet.server.fleetStore.telemetry.stats('dev-junk')).toBeNull();
  });

  it('moves a corrupt outbox aside at start-up, keeps running and says so', async () => {
    const fleet = await startFleet({ kind: 'embedded' });
    const cred = await addDevice(fleet, 'dev-corrupt');
    const stateDir = tempDir('edgefleet-agent-');
    mkdirSync(stateDir, { recursive: true });
    writeFileSync(join(stateDir, 'outbox.db'), Buffer.alloc(8192, 0xab));
    const { agent } = await startAgent(cred, { stateDir });
    await applied(agent, 1);
    await waitFor('the fleet hears of it', () => fleet.server.fleetStore.telemetry.list('dev-corrupt', { limit: 100 }).some((r) => r.type === 'outbox.corrupt'), 20_000);
  });

  it('reports what it dropped to stay within bounds, with exact counts', async () => {
    const fleet = await startFleet({ kind: 'embedded' });
    const cred = await addDevice(fleet, 'dev-full');
    const { agent } = await startAgent(cred, { outbox: { dropReportIntervalSec: 1, classes: { sample: { maxBytes: 64 * 1024 } } } });
    await applied(agent, 1);
    await fleet.server.stop();
    await Promise.all(Array.from({ length: 500 }, (_, i) => agent.report('sample', 'prediction', { i, input: 'x'.repeat(1000) })));
    const dropped = agent.outbox.droppedCounts().sample;
    expect(dropped).toBeGreaterThan(400);
    await fleet.restart();
    await waitFor(
      'the fleet has the drop event and the agent’s count',
      async () => {
        const events = fleet.server.fleetStore.telemetry.list('dev-full', { limit: 100, cls: 'event' }).filter((r) => r.type === 'outbox.dropped');
        const show = await fleet.admin.call('devices.show', { deviceId: 'dev-full' });
        return events.length > 0 && show.telemetry?.backlog.dropped.sample === dropped;
      },
      20_000,
    );
    const event = fleet.server.fleetStore.telemetry.list('dev-full', { limit: 100, cls: 'event' }).find((r) => r.type === 'outbox.dropped');
    expect(event?.body).toMatchObject({ since: { sample: dropped }, total: { sample: dropped } });
    // What survived the bounds arrives; what was dropped does not, and the two add up.
    const samples = fleet.server.fleetStore.telemetry.list('dev-full', { limit: 1000, cls: 'sample' });
    expect(samples.length + dropped).toBe(500);
  });
});
