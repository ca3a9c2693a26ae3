import { EdgefleetError, defaultDesiredDoc, MAX_TAGS_PER_DEVICE, type DeviceDetail, type DeviceSummary, type Role, type RoundConfigInput } from '../../proto/index.js';
import { generateSecret, hashSecret } from '../auth/credentials.js';
import type { DesiredStateService } from '../sync/desired.js';
import type { FleetKeyring } from '../registry/keys.js';
import { createModelHandlers } from '../registry/ops.js';
import type { Registry } from '../registry/registry.js';
import type { DeviceRow, FleetStore } from '../store/types.js';
import type { Handlers } from './dispatcher.js';
import type { RolloutService } from '../rollouts/service.js';
import type { RoundService } from '../federated/service.js';

export interface HandlerDeps {
  store: FleetStore;
  desired: DesiredStateService;
  /** The broker URL handed out with new credentials. */
  brokerUrl: string;
  now: () => number;
  /** Refused-message counters of the fleet, by code. */
  rejected: () => Record<string, number>;
  /** Called after a credential was issued or revoked (regenerates broker files, drops sessions). */
  principalsChanged: (removed?: string) => Promise<void>;
  /** The model registry and the fleet signing key (models.*, keys.*). */
  registry: Registry;
  keys: FleetKeyring;
  /** The artifact server's URL as devices reach it. */
  artifactsUrl: () => string;
  /** Staged rollouts and safe mode. */
  rollouts: RolloutService;
  /** Federated rounds. */
  rounds: RoundService;
}

/** Names no device or operator may take. */
const RESERVED = new Set(['fleet', 'edgefleet', 'admin-bootstrap']);

export function summarize(store: FleetStore, d: DeviceRow): DeviceSummary {
  const desired = store.desired.get(d.id);
  const reported = store.reported.get(d.id);
  return {
    deviceId: d.id,
    presence: d.presence,
    lastSeen: d.lastSeen,
    desiredVersion: desired?.version ?? 0,
    reportedVersion: reported?.desiredVersion ?? null,
    inSync: !!desired && !!reported && reported.desiredVersion === desired.version && reported.drift.length === 0,
    createdAt: d.createdAt,
    tags: d.tags,
    safeMode: desired?.doc.safeMode === true,
  };
}

function requireDevice(store: FleetStore, id: string): DeviceRow {
  const d = store.devices.get(id);
  if (!d) throw new EdgefleetError('EF_UNKNOWN_DEVICE', `no device ${id}`);
  return d;
}

export function createHandlers(deps: HandlerDeps): Handlers {
  const { store, desired } = deps;

  const issue = (name: string, kind: 'device' | 'operator', role: Role | null): string => {
    if (RESERVED.has(name) || store.principals.get(name)) {
      throw new EdgefleetError(kind === 'device' ? 'EF_DEVICE_EXISTS' : 'EF_OPERATOR_EXISTS', `${name} is already taken`);
    }
    const password = generateSecret();
    store.principals.insert({ name, kind, role, secretHash: hashSecret(password), createdAt: deps.now() });
    return password;
  };

  return {
    'devices.list': () => ({ devices: store.devices.list().map((d) => summarize(store, d)) }),

    'devices.show': ({ deviceId }): DeviceDetail => {
      const d = requireDevice(store, deviceId);
      const reported = store.reported.get(deviceId);
      return {
        ...summarize(store, d),
        facts: d.facts,
        desired: desired.get(deviceId).doc,
        reported: reported?.doc ?? null,
        drift: reported?.drift ?? [],
        rejectedMessages: d.rejected,
        telemetry: store.telemetry.stats(deviceId),
      };
    },

    'devices.add': async ({ deviceId, tags }) => {
      const unique = [...new Set(tags ?? [])].sort();
      const { password, row } = store.transaction(() => {
        const password = issue(deviceId, 'device', null);
        store.devices.insert(deviceId, deps.now());
        if (unique.length > 0) store.devices.setTags(deviceId, unique);
        // A device provisioned while a safe mode covers it starts in safe mode.
        return { password, row: desired.initialize(deviceId, deps.rollouts.initialDoc(deviceId, unique, defaultDesiredDoc())) };
      });
      deps.rollouts.deviceAdded(deviceId, unique, row);
      await deps.principalsChanged();
      // The retained document is published now, so the device finds it on its first connect.
      await desired.publish(row, null);
      return { deviceId, credential: { username: deviceId, password, brokerUrl: deps.brokerUrl } };
    },

    'devices.remove': async ({ deviceId }) => {
      requireDevice(store, deviceId);
      store.principals.remove(deviceId);
      deps.rollouts.deviceRemoved(deviceId);
      await deps.principalsChanged(deviceId);
      await desired.clear(deviceId);
      return { deviceId };
    },

    'devices.tag': ({ deviceIds, add, remove }) => {
      const ids = [...new Set(deviceIds)];
      const drop = new Set(remove);
      const out = store.transaction(() =>
        ids.map((deviceId) => {
          const d = requireDevice(store, deviceId);
          const tags = [...new Set([...d.tags.filter((t) => !drop.has(t)), ...(add ?? [])])].sort();
          if (tags.length > MAX_TAGS_PER_DEVICE) throw new EdgefleetError('EF_BAD_PARAMS', `${deviceId} would have ${tags.length} tags; at most ${MAX_TAGS_PER_DEVICE}`);
          store.devices.setTags(deviceId, tags);
          return { deviceId, tags };
        }),
      );
      for (const d of out) deps.rollouts.tagsChanged(d.deviceId, d.tags);
      return { devices: out };
    },

    'desired.get': ({ deviceId }) => {
      const row = desired.get(deviceId);
      return { deviceId, version: row.version, doc: row.doc };
    },

    'desired.set': async (params) => {
      const { deviceId, baseVersion } = params;
      const change = params.patch !== undefined ? { patch: params.patch, baseVersion } : { doc: params.doc, baseVersion };
      const { row, changed, previous } = desired.change(deviceId, change);
      if (changed) await desired.publish(row, previous);
      return { deviceId, version: row.version, doc: row.doc, changed };
    },

    'audit.list': ({ limit, target }) => ({ entries: store.audit.list({ limit: limit ?? 100, target }) }),

    'operators.add': async ({ name, role }) => {
      const password = issue(name, 'operator', role);
      await deps.principalsChanged();
      return { name, role, credential: { username: name, password, brokerUrl: deps.brokerUrl } };
    },

    'operators.list': () => ({
      operators: store.principals.list('operator').map((p) => ({ name: p.name, role: p.role ?? 'viewer', createdAt: p.createdAt })),
    }),

    'operators.remove': async ({ name }, caller) => {
      const p = store.principals.get(name);
      if (!p || p.kind !== 'operator') throw new EdgefleetError('EF_UNKNOWN_OPERATOR', `no operator ${name}`);
      if (name === caller.name) throw new EdgefleetError('EF_FORBIDDEN', 'an operator cannot remove itself');
      store.principals.remove(name);
      await deps.principalsChanged(name);
      return { name };
    },

    'telemetry.list': ({ deviceId, limit, cls, beforeSeq }) => {
      requireDevice(store, deviceId);
      return { deviceId, records: store.telemetry.list(deviceId, { limit: limit ?? 50, cls, beforeSeq }) };
    },

    'fleet.stats': () => {
      const devices = store.devices.list();
      const summaries = devices.map((d) => summarize(store, d));
      return {
        devices: devices.length,
        online: devices.filter((d) => d.presence === 'online').length,
        inSync: summaries.filter((s) => s.inSync).length,
        rejected: deps.rejected(),
      };
    },

    'rollouts.start': (p, caller) => deps.rollouts.startRollout(p, caller.name),
    'rollouts.list': ({ name, active, limit }) => ({ rollouts: deps.rollouts.list({ name, active, limit: limit ?? 50 }) }),
    'rollouts.show': ({ id }) => deps.rollouts.show(id),
    'rollouts.pause': ({ id, reason }, caller) => deps.rollouts.command(id, 'pause', caller.name, reason),
    'rollouts.resume': ({ id, reason }, caller) => deps.rollouts.command(id, 'resume', caller.name, reason),
    'rollouts.approve': ({ id, reason }, caller) => deps.rollouts.command(id, 'approve', caller.name, reason),
    'rollouts.abort': ({ id, reason }, caller) => deps.rollouts.command(id, 'abort', caller.name, reason),
    'safeMode.on': ({ selector, reason }, caller) => deps.rollouts.safeModeOn(selector ?? { kind: 'all' }, reason, caller.name),
    'safeMode.off': ({ selector }, caller) => deps.rollouts.safeModeOff(selector, caller.name),
    'safeMode.status': () => deps.rollouts.safeModeStatus(),

    'fl.start': ({ config }, caller) => deps.rounds.startRound(config, caller.name),
    'fl.list': ({ model, active, limit }) => ({ rounds: deps.rounds.list({ model, active, limit: limit ?? 50 }) }),
    'fl.show': ({ id }) => deps.rounds.view(id),
    'fl.abort': ({ id }, caller) => deps.rounds.abort(id, caller.name),
    'fl.schedule': ({ config, everySec }, caller) => deps.rounds.schedule(config as RoundConfigInput, everySec, caller.name),
    'fl.schedules': () => ({ schedules: deps.rounds.schedules() }),
    'fl.unschedule': ({ id }, caller) => ({ removed: deps.rounds.unschedule(id, caller.name) }),

    ...createModelHandlers({ store, registry: deps.registry, keys: deps.keys, desired, now: deps.now, artifactsUrl: deps.artifactsUrl }),
  };
}
