/** The operator channel: roles, audit, and at-least-once delivery answered exactly once. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodeJson, OpsReply, topics } from '../../proto/index.js';
import { OpsClient } from '../../scripts/ops-client.js';
import { cleanup, rawClient, startFleet, waitFor, type FleetHandle } from '../helpers/fleet.js';

describe('operator channel', () => {
  let fleet: FleetHandle;
  beforeAll(async () => {
    fleet = await startFleet({ kind: 'embedded' });
  });
  afterAll(cleanup);

  it('authorizes each method by role and audits every request, refused ones too', async () => {
    const { credential } = await fleet.admin.call('operators.add', { name: 'vera', role: 'viewer' });
    const vera = await OpsClient.connect({ url: credential.brokerUrl, username: 'vera', password: credential.password });
    try {
      expect((await vera.call('devices.list', {})).devices).toEqual([]);
      expect(await vera.request('devices.add', { deviceId: 'sneaky' })).toMatchObject({ ok: false, error: { code: 'EF_FORBIDDEN' } });
      expect(await vera.request('desired.set', { deviceId: 'x', patch: [] })).toMatchObject({ ok: false, error: { code: 'EF_FORBIDDEN' } });
      expect(await vera.request('no.such.method', {})).toMatchObject({ ok: false, error: { code: 'EF_UNKNOWN_METHOD' } });
      expect(await fleet.admin.request('devices.add', { deviceId: 'has/slash' })).toMatchObject({ ok: false, error: { code: 'EF_BAD_PARAMS' } });
    } finally {
      await vera.close();
    }
    const entries = (await fleet.admin.call('audit.list', { limit: 100 })).entries;
    const byVera = entries.filter((e) => e.actor === 'vera').map((e) => [e.action, e.ok]);
    expect(byVera).toEqual([
      ['no.such.method', false],
      ['desired.set', false],
      ['devices.add', false],
      ['devices.list', true],
    ]);
    expect(fleet.server.fleetStore.devices.get('sneaky')).toBeNull();
  });

  it('answers a request delivered twice without running it twice', async () => {
    const client = await rawClient(fleet.server.brokerUrl, { clientId: 'admin~dup', username: 'admin', password: fleet.profile.password });
    const replies: OpsReply[] = [];
    client.on('message', (_t, payload) => replies.push(OpsReply.parse(JSON.parse(payload.toString()))));
    await client.subscribeAsync(topics.opsReply('admin'), { qos: 1 });
    const before = (await fleet.admin.call('audit.list', { limit: 1000 })).entries.length;
    const request = encodeJson({ id: 'dup-1', method: 'desired.set', params: { deviceId: 'dup-dev', patch: [] } });
    await fleet.admin.call('devices.add', { deviceId: 'dup-dev' });
    const add = encodeJson({ id: 'dup-2', method: 'devices.add', params: { deviceId: 'dup-dev-2' } });
    for (const payload of [request, request, add, add]) await client.publishAsync(topics.opsRequest('admin'), payload, { qos: 1 });
    await waitFor('four replies', () => replies.filter((r) => r.id === 'dup-1' || r.id === 'dup-2').length === 4);
    const mine = replies.filter((r) => r.id === 'dup-2');
    expect(mine.map((r) => r.ok)).toEqual([true, true]);
    expect(mine[0]).toEqual(mine[1]);
    const after = (await fleet.admin.call('audit.list', { limit: 1000 })).entries;
    // The first audit.list (audited after it read), devices.add of dup-dev, dup-1 once, dup-2 once.
    expect(after.length - before).toBe(4);
  });
});
