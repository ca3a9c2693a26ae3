/**
 * The authorization matrix, against the embedded broker and against a real Mosquitto running the
 * generated password file and ACL. Every attempt to cross an identity's bounds must fail, and a
 * privileged observer subscribed to the whole tree proves that nothing crossed.
 */
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ErrorWithSubackPacket, type MqttClient } from 'mqtt';
import { TOPIC_ROOT, topics } from '../../proto/index.js';
import { addDevice, addFleetIdentity, cleanup, connectCode, rawClient, startFleet, tempDir, waitFor, type Credential, type FleetHandle } from '../helpers/fleet.js';
import { freePort, mosquittoInstalled, startMosquitto } from '../helpers/mosquitto.js';

interface Arena {
  url: string;
  fleet: FleetHandle;
  observer: { username: string; password: string };
  /** What a device connecting with someone else's client id gets: refused, or accepted as itself. */
  reusedIdIsRefused: boolean;
}

/** First connect after a credential was issued: Mosquitto picks up a reload a moment later. */
async function connectAs(url: string, cred: { username: string; password: string }, clientId = cred.username): Promise<MqttClient> {
  let last: unknown;
  for (let i = 0; i < 50; i++) {
    try {
      return await rawClient(url, { clientId, username: cred.username, password: cred.password, clean: true });
    } catch (e) {
      last = e;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  throw last;
}

/** SUBACK return codes, including refusals (0x80), which mqtt.js turns into an error. */
async function grants(client: MqttClient, filters: string[]): Promise<number[]> {
  try {
    return (await client.subscribeAsync(filters, { qos: 1 })).map((g) => g.qos);
  } catch (e) {
    if (e instanceof ErrorWithSubackPacket) return e.packet.granted.map((g) => (typeof g === 'number' ? g : (g as { qos: number }).qos));
    throw e;
  }
}

function collect(client: MqttClient): { topic: string; payload: string }[] {
  const seen: { topic: string; payload: string }[] = [];
  client.on('message', (topic, payload) => seen.push({ topic, payload: payload.toString() }));
  return seen;
}

function matrix(name: string, setup: () => Promise<Arena | null>): void {
  describe(name, () => {
    let arena: Arena | null = null;
    let a: Credential;
    let b: Credential;
    let op: { username: string; password: string };

    beforeAll(async () => {
      arena = await setup();
      if (!arena) return;
      a = await addDevice(arena.fleet, 'dev-a');
      b = await addDevice(arena.fleet, 'dev-b');
      const added = await arena.fleet.admin.call('operators.add', { name: 'ops-viewer', role: 'viewer' });
      op = added.credential;
    }, 60_000);
    afterAll(cleanup);

    it('refuses wrong passwords, unknown users and anonymous clients at CONNECT', async (ctx) => {
      if (!arena) return ctx.skip();
      const refused = [4, 5];
      expect(refused).toContain(await connectCode(arena.url, { clientId: 'dev-a', username: 'dev-a', password: 'wrong' }));
      expect(refused).toContain(await connectCode(arena.url, { clientId: 'nobody', username: 'nobody', password: a.password }));
      expect(refused).toContain(await connectCode(arena.url, { clientId: 'anon' }));
      // A device's password does not open an operator's account, nor the fleet's.
      expect(refused).toContain(await connectCode(arena.url, { clientId: 'ops-viewer', username: 'ops-viewer', password: a.password }));
      expect(refused).toContain(await connectCode(arena.url, { clientId: 'fleet', username: 'fleet', password: a.password }));
    });

    it('never serves a subscription outside the identity’s grants', async (ctx) => {
      if (!arena) return ctx.skip();
      const marker = `LEAK-${randomBytes(6).toString('hex')}`;
      const observer = await connectAs(arena.url, arena.observer, 'observer');
      const devA = await connectAs(arena.url, a);
      const viewer = await connectAs(arena.url, op, arena.reusedIdIsRefused ? 'ops-viewer~sub' : 'ops-viewer');
      const seenByA = collect(devA);
      const seenByViewer = collect(viewer);
      const subA = await grants(devA, [topics.down('dev-b', 'desired'), topics.up('dev-b', 'status'), `${TOPIC_ROOT}/#`, topics.opsReply('admin'), '#']);
      const subV = await grants(viewer, [topics.opsReply('admin'), topics.up('dev-a', 'status'), topics.down('dev-a', 'desired')]);
      // The embedded broker refuses each (SUBACK 0x80); Mosquitto may grant a wide filter and filter deliveries instead.
      if (arena.reusedIdIsRefused) {
        expect(subA).toEqual([128, 128, 128, 128, 128]);
        expect(subV).toEqual([128, 128, 128]);
      }
      await devA.subscribeAsync(topics.deviceDownFilter('dev-a'), { qos: 1 });
      await viewer.subscribeAsync(topics.opsReply('ops-viewer'), { qos: 1 });

      const evil = Buffer.from(JSON.stringify({ marker }));
      for (const topic of [topics.down('dev-b', 'desired'), topics.up('dev-b', 'status'), topics.opsReply('admin'), topics.up('dev-a', 'status')]) {
        await observer.publishAsync(topic, evil, { qos: 1 });
      }
      const sentinel = Buffer.from(`SENTINEL-${marker}`);
      await observer.publishAsync(topics.down('dev-a', 'desired'), sentinel, { qos: 1 });
      await observer.publishAsync(topics.opsReply('ops-viewer'), sentinel, { qos: 1 });
      await waitFor('dev-a sees its own downstream', () => seenByA.some((m) => m.payload.startsWith('SENTINEL')));
      await waitFor('the viewer sees its own replies', () => seenByViewer.some((m) => m.payload.startsWith('SENTINEL')));
      expect(seenByA.filter((m) => m.payload.includes(marker) && !m.payload.startsWith('SENTINEL'))).toEqual([]);
      expect(seenByViewer.filter((m) => m.payload.includes(marker) && !m.payload.startsWith('SENTINEL'))).toEqual([]);
      await Promise.all([observer.endAsync(), devA.endAsync(), viewer.endAsync()]);
    });

    it('lets no publication outside the identity’s grants reach anyone', async (ctx) => {
      if (!arena) return ctx.skip();
      const marker = `LEAK-${randomBytes(6).toString('hex')}`;
      const observer = await connectAs(arena.url, arena.observer, 'observer');
      const observed = collect(observer);
      await observer.subscribeAsync(`${TOPIC_ROOT}/#`, { qos: 1 });
      const devB = await connectAs(arena.url, b);
      let bDropped = false;
      devB.on('close', () => (bDropped = true));

      const evil = Buffer.from(JSON.stringify({ marker }));
      const attempts: [{ username: string; password: string }, string][] = [
        [a, topics.up('dev-b', 'status')], // speak for another device
        [a, topics.up('dev-b', 'reported')],
        [a, topics.down('dev-b', 'desired')], // hand another device its desired state
        [a, topics.down('dev-a', 'desired')], // hand itself desired state
        [a, topics.opsRequest('admin')], // an operator request, as an operator
        [a, topics.opsRequest('dev-a')], // an operator request, as itself
        [a, topics.opsReply('admin')], // forge a reply
        [a, `${TOPIC_ROOT}/other`],
        [a, 'elsewhere/entirely'],
        [op, topics.up('dev-a', 'status')], // an operator speaking for a device
        [op, topics.down('dev-a', 'desired')],
        [op, topics.opsRequest('admin')], // another operator's requests
      ];
      let n = 0;
      for (const [cred, topic] of attempts) {
        // One connection per attempt: the embedded broker drops a client whose PUBLISH it refuses,
        // Mosquitto acknowledges and discards it (MQTT 3.1.1 has no way to refuse a PUBLISH).
        // Either way the verdict is in once the PUBACK or the close arrives.
        const clientId = cred === op && arena.reusedIdIsRefused ? `ops-viewer~${n++}` : cred.username;
        const client = await connectAs(arena.url, cred, clientId);
        const closed = new Promise<void>((r) => client.once('close', () => r()));
        const retain = topic.includes('/down/') || topic.endsWith('/status');
        await Promise.race([client.publishAsync(topic, evil, { qos: 1, retain }).catch(() => undefined), closed]);
        await client.endAsync(true);
      }

      // A sentinel from each attacker on its own topic goes round after everything it tried.
      const sentinel = `SENTINEL-${marker}`;
      const lastA = await connectAs(arena.url, a);
      await lastA.publishAsync(topics.up('dev-a', 'facts'), Buffer.from(sentinel), { qos: 1 });
      const lastOp = await connectAs(arena.url, op, arena.reusedIdIsRefused ? 'ops-viewer~last' : 'ops-viewer');
      await lastOp.publishAsync(topics.opsRequest('ops-viewer'), Buffer.from(sentinel), { qos: 1 });
      await waitFor('the observer sees both sentinels', () => observed.filter((m) => m.payload === sentinel).length === 2);

      expect(observed.filter((m) => m.payload.includes(marker) && m.payload !== sentinel)).toEqual([]);
      expect(bDropped).toBe(false);
      // Nothing was retained where it should not be: a fresh subscriber sees the fleet's own messages only.
      const fresh = await connectAs(arena.url, arena.observer, 'observer');
      const retained = collect(fresh);
      await fresh.subscribeAsync(`${TOPIC_ROOT}/#`, { qos: 1 });
      await waitFor('retained desired state of both devices', () => retained.filter((m) => m.topic.endsWith('/down/desired')).length >= 2);
      expect(retained.filter((m) => m.payload.includes(marker))).toEqual([]);
    });

    it('does not let one identity take over another one’s session by client id', async (ctx) => {
      if (!arena) return ctx.skip();
      const devB = await connectAs(arena.url, b);
      let bDropped = false;
      devB.on('close', () => (bDropped = true));
      const code = await connectCode(arena.url, { clientId: 'dev-b', username: 'dev-a', password: a.password });
      if (arena.reusedIdIsRefused) expect(code).toBe(2);
      // Mosquitto replaces the client id with the user name (use_username_as_clientid): A connects as A.
      else expect(code).toBe(0);
      await devB.publishAsync(topics.up('dev-b', 'facts'), Buffer.from('ping'), { qos: 1 });
      expect(bDropped).toBe(false);
      expect(devB.connected).toBe(true);
    });

    it('forgets a removed device at once', async (ctx) => {
      if (!arena) return ctx.skip();
      const url = arena.url;
      const c = await addDevice(arena.fleet, 'dev-c');
      const devC = await connectAs(arena.url, c);
      const closed = new Promise<void>((r) => devC.once('close', () => r()));
      await arena.fleet.admin.call('devices.remove', { deviceId: 'dev-c' });
      if (arena.reusedIdIsRefused) await closed; // the embedded broker drops the live session too
      await waitFor('dev-c is refused', async () => [4, 5].includes(await connectCode(url, { clientId: 'dev-c', username: 'dev-c', password: c.password })));
    });
  });
}

matrix('authorization: embedded broker', async () => {
  const fleet = await startFleet({ kind: 'embedded' });
  return { url: fleet.server.brokerUrl, fleet, observer: addFleetIdentity(fleet, 'observer'), reusedIdIsRefused: true };
});

matrix('authorization: Mosquitto with the generated password file and ACL', async () => {
  if (!mosquittoInstalled()) return null;
  const dataDir = tempDir();
  const mqDir = tempDir('edgefleet-mosquitto-');
  const port = await freePort();
  const cli = spawnSync(process.execPath, ['dist/scripts/cli.js', 'broker-config', 'mosquitto', '--out', mqDir, '--data-dir', dataDir, '--port', String(port)], {
    encoding: 'utf8',
  });
  expect(cli.status, cli.stderr).toBe(0);
  const mosquitto = await startMosquitto(join(mqDir, 'mosquitto.conf'));
  const url = `mqtt://127.0.0.1:${port}`;
  const fleet = await startFleet(
    { kind: 'external', url, protocolVersion: 4, username: 'fleet', mosquittoConfigDir: mqDir, mosquittoReloadCommand: `kill -HUP ${mosquitto.pid}` },
    dataDir,
  );
  expect(fleet.server.fleetStore.principals.get('fleet')).not.toBeNull();
  const observer = addFleetIdentity(fleet, 'observer');
  return { url, fleet, observer, reusedIdIsRefused: false };
});
