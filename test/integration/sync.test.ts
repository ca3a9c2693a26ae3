/**
 * Desired and reported state between both daemons, end to end: against the embedded broker on a
 * free port, and the same suite against the machine's Mosquitto at 127.0.0.1:1883 (MQTT 3.1.1 and
 * MQTT 5) when it is reachable.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { MqttClient } from 'mqtt';
import { DesiredMessage, topics } from '../../proto/index.js';
import {
  addDevice,
  addFleetIdentity,
  applied,
  brokerReachable,
  cleanup,
  rawClient,
  startAgent,
  startFleet,
  uniq,
  waitFor,
  type BrokerTarget,
  type FleetHandle,
} from '../helpers/fleet.js';

const SHARED_BROKER = process.env.EDGEFLEET_TEST_BROKER_URL ?? 'mqtt://127.0.0.1:1883';
const sharedReachable = await brokerReachable(SHARED_BROKER);

/** A client with the fleet's powers, to do to the broker what a crash or an operator of the broker would. */
async function fleetSideClient(fleet: FleetHandle, target: BrokerTarget): Promise<MqttClient> {
  const url = target.kind === 'embedded' ? fleet.server.brokerUrl : target.url;
  const name = uniq('observer');
  if (target.kind === 'embedded') {
    const { password } = addFleetIdentity(fleet, name);
    return rawClient(url, { clientId: name, username: name, password, clean: true });
  }
  return rawClient(url, { clientId: name, clean: true });
}

async function retainedDesired(client: MqttClient, deviceId: string, waitMs = 3000): Promise<DesiredMessage | null> {
  const topic = topics.down(deviceId, 'desired');
  const got = new Promise<DesiredMessage | null>((resolve) => {
    const timer = setTimeout(() => resolve(null), waitMs);
    client.on('message', (t, payload, packet) => {
      if (t !== topic || !packet.retain) return;
      clearTimeout(timer);
      resolve(payload.length === 0 ? null : DesiredMessage.parse(JSON.parse(payload.toString())));
    });
  });
  await client.subscribeAsync(topic, { qos: 1 });
  const msg = await got;
  await client.unsubscribeAsync(topic);
  return msg;
}

function syncSuite(name: string, target: BrokerTarget, skip = false): void {
  describe.skipIf(skip)(name, () => {
    let fleet: FleetHandle;
    const used: string[] = [];
    const device = (prefix: string): string => {
      const id = target.kind === 'embedded' ? prefix : uniq(prefix);
      used.push(id);
      return id;
    };
    const protocolVersion = target.kind === 'embedded' ? 4 : target.protocolVersion;

    beforeAll(async () => {
      fleet = await startFleet(target);
    });
    afterAll(async () => {
      if (target.kind === 'external') {
        // Leave the shared broker as we found it: no retained messages, no persistent sessions.
        const c = await rawClient(target.url, { clientId: uniq('sweeper'), clean: true });
        for (const id of used) {
          for (const t of [topics.up(id, 'status'), topics.down(id, 'desired')]) await c.publishAsync(t, Buffer.alloc(0), { qos: 1, retain: true });
        }
      }
      await cleanup();
      if (target.kind === 'external') {
        // A clean connect under each persistent client id discards the session the broker kept for it.
        for (const id of [...used, fleet.brokerUsername]) await (await rawClient(target.url, { clientId: id, clean: true })).endAsync();
        await cleanup();
      }
    });

    it('connects a provisioned device: presence, facts and reported state reach the fleet', async () => {
      const id = device('dev-hello');
      const cred = await addDevice(fleet, id);
      const { agent } = await startAgent(cred, { protocolVersion, url: target.kind === 'external' ? target.url : undefined });
      await applied(agent, 1);
      await waitFor('device online, facts and reported state stored', async () => {
        const d = await fleet.admin.call('devices.show', { deviceId: id });
        return d.presence === 'online' && d.facts !== null && d.inSync;
      });
      const d = await fleet.admin.call('devices.show', { deviceId: id });
      expect(d.facts?.os.arch).toBe(process.arch);
      expect(d.facts?.memory.totalBytes).toBeGreaterThan(0);
      expect(d.reported?.desiredVersion).toBe(1);
      expect(d.drift).toEqual([]);
      await agent.stop();
      await waitFor('device offline after a clean stop', async () => (await fleet.admin.call('devices.show', { deviceId: id })).presence === 'offline');
    });

    it('applies a change as a patch from n to n + 1 and reports it', async () => {
      const id = device('dev-patch');
      const cred = await addDevice(fleet, id);
      const { agent } = await startAgent(cred, { protocolVersion, url: target.kind === 'external' ? target.url : undefined });
      await applied(agent, 1);
      // Its report of version 1 stored first: one still in flight after the change would be behind
      // version 2 when it arrives, and the fleet would (rightly) send the whole document again.
      await waitFor('fleet has the report of version 1', async () => (await fleet.admin.call('devices.show', { deviceId: id })).reportedVersion === 1);
      const observer = await fleetSideClient(fleet, target);
      const res = await fleet.admin.call('desired.set', { deviceId: id, patch: [{ op: 'replace', path: '/agent/reportIntervalSec', value: 60 }] });
      expect(res.version).toBe(2);
      await applied(agent, 2);
      expect(agent.settings?.reportIntervalSec).toBe(60);
      const retained = await retainedDesired(observer, id);
      expect(retained).toMatchObject({ kind: 'patch', from: 1, to: 2 });
      await waitFor('fleet sees the device in sync at version 2', async () => {
        const d = await fleet.admin.call('devices.show', { deviceId: id });
        return d.inSync && d.reportedVersion === 2;
      });
    });

    it('converges a device that was offline while its desired state changed three times', async () => {
      const id = device('dev-away');
      const cred = await addDevice(fleet, id);
      const url = target.kind === 'external' ? target.url : undefined;
      const first = await startAgent(cred, { protocolVersion, url });
      await applied(first.agent, 1);
      await first.agent.stop();
      for (const value of [20, 30, 40]) {
        await fleet.admin.call('desired.set', { deviceId: id, patch: [{ op: 'replace', path: '/agent/reportIntervalSec', value }] });
      }
      await fleet.admin.call('desired.set', { deviceId: id, patch: [{ op: 'replace', path: '/agent/logLevel', value: 'debug' }] });
      const { agent } = await startAgent(cred, { protocolVersion, url, stateDir: first.stateDir });
      await applied(agent, 5);
      expect(agent.settings).toMatchObject({ reportIntervalSec: 40, logLevel: 'debug' });
      await waitFor('fleet sees the device in sync at version 5', async () => {
        const d = await fleet.admin.call('devices.show', { deviceId: id });
        return d.inSync && d.reportedVersion === 5;
      });
    });

    it('repairs a device whose retained desired state the broker lost', async () => {
      const id = device('dev-lost');
      const cred = await addDevice(fleet, id);
      const url = target.kind === 'external' ? target.url : undefined;
      const first = await startAgent(cred, { protocolVersion, url });
      await applied(first.agent, 1);
      await first.agent.stop();
      await fleet.admin.call('desired.set', { deviceId: id, patch: [{ op: 'replace', path: '/agent/factsIntervalSec', value: 600 }] });
      const observer = await fleetSideClient(fleet, target);
      await observer.publishAsync(topics.down(id, 'desired'), Buffer.alloc(0), { qos: 1, retain: true });
      await waitFor('the broker has no retained desired state', async () => (await retainedDesired(observer, id, 300)) === null);
      const { agent } = await startAgent(cred, { protocolVersion, url, stateDir: first.stateDir });
      await applied(agent, 2);
      expect(agent.settings?.factsIntervalSec).toBe(600);
    });

    it('refuses a change that does not apply or is not valid, and keeps the previous state', async () => {
      const id = device('dev-refuse');
      await addDevice(fleet, id);
      const before = await fleet.admin.call('desired.get', { deviceId: id });
      const bad = [
        { patch: [{ op: 'test', path: '/agent/logLevel', value: 'trace' }], code: 'EF_PATCH_FAILED' },
        { patch: [{ op: 'remove', path: '/nothing/here' }], code: 'EF_PATCH_FAILED' },
        { patch: [{ op: 'replace', path: '/agent/reportIntervalSec', value: 1 }], code: 'EF_DESIRED_INVALID' },
        { patch: [{ op: 'add', path: '/unknown', value: 1 }], code: 'EF_DESIRED_INVALID' },
        { patch: [{ op: 'replace', path: '/agent/logLevel', value: 'warn' }], baseVersion: 7, code: 'EF_VERSION_CONFLICT' },
      ] as const;
      for (const b of bad) {
        const reply = await fleet.admin.request('desired.set', { deviceId: id, patch: b.patch, ...('baseVersion' in b ? { baseVersion: b.baseVersion } : {}) });
        expect(reply).toMatchObject({ ok: false, error: { code: b.code } });
      }
      expect(await fleet.admin.call('desired.get', { deviceId: id })).toEqual(before);
      const unknown = await fleet.admin.request('desired.set', { deviceId: 'no-such-device', patch: [] });
      expect(unknown).toMatchObject({ ok: false, error: { code: 'EF_UNKNOWN_DEVICE' } });
    });

    it('loses no device, desired state or retained message across a fleet-server restart', async () => {
      const id = device('dev-restart');
      const cred = await addDevice(fleet, id);
      const url = target.kind === 'external' ? target.url : undefined;
      const { agent } = await startAgent(cred, { protocolVersion, url });
      await applied(agent, 1);
      await fleet.admin.call('desired.set', { deviceId: id, patch: [{ op: 'replace', path: '/agent/reportIntervalSec', value: 120 }] });
      await applied(agent, 2);
      const before = await fleet.admin.call('devices.list', {});
      const auditBefore = (await fleet.admin.call('audit.list', { limit: 1000 })).entries.length;

      await fleet.restart();

      const after = await fleet.admin.call('devices.list', {});
      expect(after.devices.map((d) => d.deviceId).sort()).toEqual(before.devices.map((d) => d.deviceId).sort());
      expect((await fleet.admin.call('desired.get', { deviceId: id })).version).toBe(2);
      expect((await fleet.admin.call('audit.list', { limit: 1000 })).entries.length).toBeGreaterThan(auditBefore);
      const observer = await fleetSideClient(fleet, target);
      const retained = await retainedDesired(observer, id);
      // A patch 1→2, or the whole document at 2 if the device asked for it meanwhile.
      expect(retained && (retained.kind === 'full' ? retained.version : retained.to)).toBe(2);
      // The agent's session survived: it reconnects by itself and keeps following.
      await waitFor('agent reconnected', () => agent.connected);
      await fleet.admin.call('desired.set', { deviceId: id, patch: [{ op: 'replace', path: '/agent/reportIntervalSec', value: 180 }] });
      await applied(agent, 3);
      expect(agent.settings?.reportIntervalSec).toBe(180);
    });
  });
}

syncSuite('desired-state sync: embedded broker', { kind: 'embedded' });
syncSuite(`desired-state sync: external Mosquitto at ${SHARED_BROKER}, MQTT 3.1.1`, { kind: 'external', url: SHARED_BROKER, protocolVersion: 4 }, !sharedReachable);
syncSuite(`desired-state sync: external Mosquitto at ${SHARED_BROKER}, MQTT 5`, { kind: 'external', url: SHARED_BROKER, protocolVersion: 5 }, !sharedReachable);
