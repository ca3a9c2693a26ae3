import { modelRef, type ModelSlot, type ModelVersionSummary } from '../../proto/index.js';
import type { Handlers } from '../ops/dispatcher.js';
import type { DesiredStateService } from '../sync/desired.js';
import type { FleetStore, ModelVersionRow } from '../store/types.js';
import type { FleetKeyring } from './keys.js';
import type { Registry } from './registry.js';

export interface ModelHandlerDeps {
  store: FleetStore;
  registry: Registry;
  keys: FleetKeyring;
  desired: DesiredStateService;
  now: () => number;
  /** The artifact server's URL as devices reach it. */
  artifactsUrl: () => string;
}

type ModelMethods =
  | 'models.publish'
  | 'models.list'
  | 'models.show'
  | 'models.setStatus'
  | 'models.assign'
  | 'models.provisioning'
  | 'keys.show'
  | 'keys.rotate';

/** How much of a version's audit trail `models.show` returns, newest first. */
const SHOW_AUDIT_LIMIT = 200;

function summary(row: ModelVersionRow): ModelVersionSummary {
  const { manifestJson: _manifest, ...rest } = row;
  return rest;
}

/** The operator methods of the registry and the fleet key; fleet-server/ops/handlers.ts spreads them in. */
export function createModelHandlers(deps: ModelHandlerDeps): Pick<Handlers, ModelMethods> {
  const { store, registry, keys, desired, now } = deps;
  return {
    'models.publish': (params, caller) => registry.publish(params, caller.name),

    'models.list': ({ name, limit }) => ({ versions: registry.list(name, limit) }),

    'models.show': ({ name, version }) => {
      const row = registry.get(name, version);
      return {
        ...summary(row),
        signed: registry.signed(row),
        audit: store.audit.list({ limit: SHOW_AUDIT_LIMIT, target: modelRef(name, row.version) }),
        transfer: store.transfers.totals(name, row.version),
      };
    },

    'models.setStatus': ({ name, version, status, reason }, caller) => {
      const r = registry.setStatus(name, version, status, caller.name, reason);
      return { name, version, status: r.status, previous: r.previous };
    },

    'models.assign': async ({ name, version, deviceIds, shadow }, caller) => {
      const row = registry.assignable(name, version);
      const slot: ModelSlot = { version, manifestSha256: row.manifestSha256, ...(shadow ? { shadow } : {}) };
      const ids = [...new Set(deviceIds)];
      // All devices or none: one transaction around every change (each change nests as a savepoint).
      // A model name cannot hold "/" or "~", so it is a JSON Pointer token as it stands (RFC 6901 §3).
      const changes = store.transaction(() => {
        const done = ids.map((deviceId) => ({ deviceId, ...desired.change(deviceId, { patch: [{ op: 'add', path: `/models/${name}`, value: slot }] }) }));
        store.audit.append({ ts: now(), actor: caller.name, action: 'model.assigned', target: modelRef(name, version), ok: true, detail: { deviceIds: ids } });
        return done;
      });
      await Promise.all(changes.filter((c) => c.changed).map((c) => desired.publish(c.row, c.previous)));
      return {
        name,
        version,
        manifestSha256: row.manifestSha256,
        devices: changes.map((c) => ({ deviceId: c.deviceId, desiredVersion: c.row.version, changed: c.changed })),
      };
    },

    'models.provisioning': () => ({ artifactsUrl: deps.artifactsUrl(), trustedKeys: [keys.current.publicKey] }),

    'keys.show': () => {
      const k = keys.current;
      const createdAt = k.chain.at(-1)?.createdAt ?? k.root.createdAt;
      return { keyId: k.keyId, publicKey: k.publicKey, createdAt, root: k.root, chain: k.chain };
    },

    'keys.rotate': () => {
      const { previous, current } = keys.rotate();
      return { keyId: current.keyId, previousKeyId: previous, publicKey: current.publicKey, chainLength: current.chain.length };
    },
  };
}
