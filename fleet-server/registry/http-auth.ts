import { createHash } from 'node:crypto';
import type { Role } from '../../proto/index.js';
import { verifySecret } from '../auth/credentials.js';
import type { FleetStore } from '../store/types.js';
import { parseBasicAuth } from './http-parse.js';

/** Who an HTTP request comes from: a device, or an operator with a role. */
export type HttpIdentity = { kind: 'device'; name: string } | { kind: 'operator'; name: string; role: Role };

const MAX_CACHED = 10_000;

/**
 * HTTP Basic against the same credentials as the broker: a device's id and MQTT secret, an
 * operator's name and secret. The principal is read on every request, so a removed or re-issued
 * credential stops working at once; only the PBKDF2 check of a (name, secret, stored hash) triple
 * that passed is remembered for `cacheMs`, keyed by a hash so no secret is kept in memory.
 */
export class HttpAuthenticator {
  private readonly verified = new Map<string, number>();

  constructor(
    private readonly store: FleetStore,
    private readonly cacheMs: number,
    private readonly now: () => number = Date.now,
  ) {}

  identify(authorization: string | undefined): HttpIdentity | null {
    const cred = parseBasicAuth(authorization);
    if (!cred) return null;
    const p = this.store.principals.get(cred.username);
    if (!p || (p.kind !== 'device' && p.kind !== 'operator')) return null;
    if (p.kind === 'device' && !this.store.devices.get(p.name)) return null;
    if (!this.check(cred.username, cred.password, p.secretHash)) return null;
    return p.kind === 'device' ? { kind: 'device', name: p.name } : { kind: 'operator', name: p.name, role: p.role ?? 'viewer' };
  }

  private check(name: string, secret: string, stored: string): boolean {
    const key = createHash('sha256').update(name).update('\0').update(secret).update('\0').update(stored).digest('base64');
    const now = this.now();
    const until = this.verified.get(key);
    if (until !== undefined && until > now) return true;
    if (!verifySecret(secret, stored)) return false;
    if (this.cacheMs > 0) {
      if (this.verified.size >= MAX_CACHED) this.verified.clear();
      this.verified.set(key, now + this.cacheMs);
    }
    return true;
  }
}
