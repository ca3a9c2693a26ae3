import {
  EdgefleetError,
  METHODS,
  MAX_PAYLOAD_BYTES,
  OpsRequest,
  decodeJson,
  isEdgefleetError,
  isMethod,
  roleAllows,
  summarizeIssues,
  type Method,
  type MethodParams,
  type MethodResult,
  type OpsReply,
} from '../../proto/index.js';
import type { Logger } from '../../common/log.js';
import type { RejectCounter } from '../../common/reject-counter.js';
import type { FleetStore } from '../store/types.js';

export interface Caller {
  name: string;
  role: 'viewer' | 'operator' | 'admin';
}

export type Handlers = {
  [M in Method]: (params: MethodParams<M> extends infer P ? Exclude<P, undefined> : never, caller: Caller) => MethodResult<M> | Promise<MethodResult<M>>;
};

/** How many recent requests are remembered for answering duplicates. */
const RECENT_REQUESTS = 1000;

/** Parameters worth keeping in the audit log: everything except document bodies and secrets. */
function auditDetail(method: string, params: unknown): unknown {
  if (params === null || typeof params !== 'object') return undefined;
  const { doc: _doc, ...rest } = params as Record<string, unknown>;
  if (method === 'models.publish') {
    // The signed manifest is kept in the registry; the audit log keeps what identifies it.
    const { golden: _g, baseline: _b, inputs: _i, outputs: _o, files, ...draft } = rest;
    return { ...draft, files: Array.isArray(files) ? files.length : undefined };
  }
  return method === 'desired.set' && _doc !== undefined ? { ...rest, doc: '(document)' } : rest;
}

/**
 * Operator requests: read, authorize by role, validate, run, audit, reply. Every request (also a
 * refused one) leaves one audit record. A handler that throws produces an error reply, never an
 * unhandled rejection.
 */
export class OpsDispatcher {
  /**
   * Replies to recent requests by (operator, id). QoS 1 is at-least-once: a request the broker
   * delivers twice (a reconnect, a redelivered session) is answered again, not run again.
   */
  private readonly recent = new Map<string, Promise<OpsReply>>();

  constructor(
    private readonly store: FleetStore,
    private readonly handlers: Handlers,
    private readonly log: Logger,
    private readonly rejects: RejectCounter,
    private readonly now: () => number = Date.now,
  ) {}

  async handle(operator: string, payload: Buffer): Promise<OpsReply> {
    const decoded = decodeJson(OpsRequest, payload, MAX_PAYLOAD_BYTES.opsRequest);
    if (!decoded.ok) {
      this.rejects.reject(decoded.error.code, operator, { topic: 'ops' });
      this.audit(operator, '(unreadable)', null, false, { code: decoded.error.code });
      return { id: correlationIdOf(payload), ok: false, error: { code: decoded.error.code, message: decoded.error.message } };
    }
    const req = decoded.value;
    const key = `${operator}\u0000${req.id}`;
    const seen = this.recent.get(key);
    if (seen) return seen;
    const reply = this.execute(operator, req);
    this.recent.set(key, reply);
    if (this.recent.size > RECENT_REQUESTS) this.recent.delete(this.recent.keys().next().value as string);
    return reply;
  }

  private async execute(operator: string, req: OpsRequest): Promise<OpsReply> {
    try {
      const data = await this.run(operator, req.method, req.params ?? {});
      return { id: req.id, ok: true, data };
    } catch (e) {
      const err = isEdgefleetError(e) ? e : new EdgefleetError('EF_INTERNAL', undefined, { cause: e });
      if (err.code === 'EF_INTERNAL') this.log.error({ err: e, method: req.method, operator }, 'operator request failed');
      const error = { code: err.code, message: err.message, ...(err.details === undefined ? {} : { details: err.details }) };
      return { id: req.id, ok: false, error };
    }
  }

  private async run(operator: string, method: string, rawParams: unknown): Promise<unknown> {
    const principal = this.store.principals.get(operator);
    const detail = auditDetail(method, rawParams);
    const target = targetOf(rawParams);
    const fail = (err: EdgefleetError): never => {
      this.audit(operator, method, target, false, { ...(detail as object), code: err.code });
      throw err;
    };
    if (!principal || principal.kind !== 'operator' || principal.role === null) {
      // Only reachable through a broker whose ACL lets a non-operator publish here.
      return fail(new EdgefleetError('EF_FORBIDDEN', `${operator} is not an operator`));
    }
    if (!isMethod(method)) return fail(new EdgefleetError('EF_UNKNOWN_METHOD', `unknown method ${JSON.stringify(method.slice(0, 64))}`));
    const spec = METHODS[method];
    if (!roleAllows(principal.role, spec.role)) {
      return fail(new EdgefleetError('EF_FORBIDDEN', `${method} needs role ${spec.role}; ${operator} is ${principal.role}`));
    }
    const parsed = spec.params.safeParse(rawParams);
    if (!parsed.success) return fail(new EdgefleetError('EF_BAD_PARAMS', summarizeIssues(parsed.error.issues)));
    const handler = this.handlers[method] as (p: unknown, c: Caller) => unknown;
    try {
      const result = await handler(parsed.data, { name: operator, role: principal.role });
      this.audit(operator, method, target, true, detail);
      return result;
    } catch (e) {
      return fail(isEdgefleetError(e) ? e : new EdgefleetError('EF_INTERNAL', (e as Error).message, { cause: e }));
    }
  }

  private audit(actor: string, action: string, target: string | null, ok: boolean, detail: unknown): void {
    try {
      this.store.audit.append({ ts: this.now(), actor, action, target, ok, detail });
    } catch (e) {
      this.log.error({ err: e }, 'audit write failed');
    }
  }
}

function targetOf(params: unknown): string | null {
  if (params === null || typeof params !== 'object') return null;
  const p = params as Record<string, unknown>;
  if (typeof p.id === 'number') return `rollout:${p.id}`;
  const t = p.deviceId ?? p.name;
  return typeof t === 'string' ? t.slice(0, 128) : null;
}

/** Best effort: the correlation id of a request that failed validation, so the caller can match the error. */
function correlationIdOf(payload: Buffer): string | null {
  if (payload.length > MAX_PAYLOAD_BYTES.opsRequest) return null;
  try {
    const v = JSON.parse(payload.toString('utf8')) as unknown;
    if (v && typeof v === 'object' && 'id' in v) {
      const id = (v).id;
      if (typeof id === 'string' && id.length > 0 && id.length <= 64) return id;
    }
  } catch {
    /* not JSON: nothing to echo */
  }
  return null;
}
