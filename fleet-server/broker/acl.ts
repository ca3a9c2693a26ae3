import { TOPIC_ROOT, topics } from '../../proto/index.js';
import type { PrincipalKind } from '../store/types.js';

/**
 * Who may publish and subscribe where, as data. The embedded broker evaluates these rules on every
 * PUBLISH and SUBSCRIBE; the Mosquitto generator writes the same rules into an ACL file. Anything
 * not granted here is denied.
 */
export interface Grants {
  /** Topic filters the identity may publish to. */
  write: string[];
  /** Topic filters the identity may subscribe to (and receive from). */
  read: string[];
}

export function grantsFor(kind: PrincipalKind, name: string): Grants {
  switch (kind) {
    case 'device':
      return { write: [`${topics.devicePrefix(name)}/up/+`], read: [`${topics.devicePrefix(name)}/down/+`] };
    case 'operator':
      return { write: [topics.opsRequest(name)], read: [topics.opsReply(name)] };
    case 'fleet':
      return { write: [`${TOPIC_ROOT}/#`], read: [`${TOPIC_ROOT}/#`] };
  }
}

/**
 * True when every topic matched by `requested` is also matched by `granted` (both MQTT topic
 * filters, MQTT-4.7.1). A concrete topic name is a filter without wildcards.
 */
export function filterCovers(granted: string, requested: string): boolean {
  const g = granted.split('/');
  const r = requested.split('/');
  for (let i = 0; i < g.length; i++) {
    const gl = g[i];
    if (gl === '#') return true;
    const rl = r[i];
    if (rl === undefined) return false;
    if (rl === '#') return false;
    if (gl === '+') continue;
    if (rl === '+' || gl !== rl) return false;
  }
  return r.length === g.length;
}

/** Topic names and filters that no client may use, whatever its grants. */
function malformed(topic: string): boolean {
  return topic.length === 0 || topic.length > 512 || topic.includes('\u0000') || topic.startsWith('$');
}

export function mayPublish(grants: Grants, topic: string): boolean {
  if (malformed(topic) || topic.includes('+') || topic.includes('#')) return false;
  return grants.write.some((g) => filterCovers(g, topic));
}

export function maySubscribe(grants: Grants, filter: string): boolean {
  if (malformed(filter)) return false;
  return grants.read.some((g) => filterCovers(g, filter));
}
