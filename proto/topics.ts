/**
 * Every MQTT topic of the protocol is built and parsed here, and nowhere else.
 *
 * Layout (MQTT 3.1.1 and 5 alike, no MQTT 5-only features are required):
 *   edgefleet/v1/dev/{deviceId}/up/{kind}     device → fleet
 *   edgefleet/v1/dev/{deviceId}/down/{kind}   fleet → device
 *   edgefleet/v1/ops/{operator}/req           operator → fleet
 *   edgefleet/v1/ops/{operator}/res           fleet → operator
 *
 * Identity lives in the topic so that any broker's per-user ACL can enforce it: a device may only
 * publish under its own `up/` and read its own `down/`; an operator only its own `req`/`res` pair.
 */
export const TOPIC_ROOT = 'edgefleet/v1';

/** Device upstream kinds. */
export const UP_KINDS = ['status', 'facts', 'reported', 'resync', 'telemetry', 'fl', 'update'] as const;
export type UpKind = (typeof UP_KINDS)[number];

/** Device downstream kinds. */
export const DOWN_KINDS = ['desired', 'ack', 'fl', 'candidate'] as const;
export type DownKind = (typeof DOWN_KINDS)[number];

/**
 * Identifiers that appear as a topic level. No MQTT wildcards, separators or NUL
 * (MQTT-4.7.1-1, MQTT-4.7.3-2), no leading `$` (MQTT-4.7.2-1), and short enough for
 * a broker's client id limit.
 */
export const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function isValidId(id: string): boolean {
  return ID_PATTERN.test(id);
}

function checkId(id: string): string {
  if (!isValidId(id)) throw new RangeError(`not a valid edgefleet id: ${JSON.stringify(id)}`);
  return id;
}

export const topics = {
  up: (deviceId: string, kind: UpKind): string => `${TOPIC_ROOT}/dev/${checkId(deviceId)}/up/${kind}`,
  down: (deviceId: string, kind: DownKind): string => `${TOPIC_ROOT}/dev/${checkId(deviceId)}/down/${kind}`,
  opsRequest: (operator: string): string => `${TOPIC_ROOT}/ops/${checkId(operator)}/req`,
  opsReply: (operator: string): string => `${TOPIC_ROOT}/ops/${checkId(operator)}/res`,

  /** Subscriptions of a device: its whole downstream. */
  deviceDownFilter: (deviceId: string): string => `${TOPIC_ROOT}/dev/${checkId(deviceId)}/down/+`,
  /** Subscriptions of the fleet. */
  fleetUpFilter: `${TOPIC_ROOT}/dev/+/up/+`,
  fleetOpsFilter: `${TOPIC_ROOT}/ops/+/req`,
  /** Per-identity topic prefixes, used to generate broker ACLs. */
  devicePrefix: (deviceId: string): string => `${TOPIC_ROOT}/dev/${checkId(deviceId)}`,
  opsPrefix: (operator: string): string => `${TOPIC_ROOT}/ops/${checkId(operator)}`,
} as const;

export type ParsedTopic =
  | { dir: 'up'; deviceId: string; kind: UpKind }
  | { dir: 'down'; deviceId: string; kind: DownKind }
  | { dir: 'ops-req'; operator: string }
  | { dir: 'ops-res'; operator: string };

/** Parses a concrete topic name; returns null for anything that is not one of ours. */
export function parseTopic(topic: string): ParsedTopic | null {
  const parts = topic.split('/');
  if (parts[0] !== 'edgefleet' || parts[1] !== 'v1') return null;
  const id = parts[3];
  if (id === undefined || !isValidId(id)) return null;
  if (parts.length === 5 && parts[2] === 'ops') {
    if (parts[4] === 'req') return { dir: 'ops-req', operator: id };
    if (parts[4] === 'res') return { dir: 'ops-res', operator: id };
    return null;
  }
  if (parts.length === 6 && parts[2] === 'dev') {
    const dir = parts[4];
    const kind = parts[5] as string;
    if (dir === 'up' && isOneOf(UP_KINDS, kind)) return { dir: 'up', deviceId: id, kind };
    if (dir === 'down' && isOneOf(DOWN_KINDS, kind)) return { dir: 'down', deviceId: id, kind };
  }
  return null;
}

function isOneOf<T extends string>(list: readonly T[], value: string): value is T {
  return (list as readonly string[]).includes(value);
}
