/**
 * Properties of the artifact server's parsers of outside input: the request target, Range,
 * If-None-Match and Basic credentials. Whatever a client sends, they never throw, and what they
 * return never reaches outside the file or the artifact store.
 */
import { join, resolve, sep } from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ID_PATTERN } from '../../proto/index.js';
import { noneMatch, parseBasicAuth, parseRange, parseRoute } from '../../fleet-server/registry/http-parse.js';

const hex64 = fc.stringMatching(/^[0-9a-f]{64}$/);
const size = fc.integer({ min: 0, max: 2 ** 31 });
const rangeLike = fc.oneof(
  fc.string({ maxLength: 80 }),
  fc.string({ unit: fc.constantFrom('b', 'y', 't', 'e', 's', '=', '-', ',', ' ', '0', '1', '9'), maxLength: 30 }),
  fc.tuple(fc.option(fc.bigInt({ min: 0n, max: 10n ** 30n })), fc.option(fc.bigInt({ min: 0n, max: 10n ** 30n }))).map(([a, b]) => `bytes=${a ?? ''}-${b ?? ''}`),
);

describe('parseRange', () => {
  it('never throws, and every range it returns lies inside the representation', () => {
    fc.assert(
      fc.property(fc.option(rangeLike, { nil: undefined }), size, (header, n) => {
        const r = parseRange(header, n);
        if (r.kind === 'range') {
          expect(Number.isSafeInteger(r.start) && Number.isSafeInteger(r.end)).toBe(true);
          expect(0 <= r.start && r.start <= r.end && r.end < n).toBe(true);
        }
      }),
      { numRuns: 2000 },
    );
  });

  it('agrees with a reference reading of RFC 9110 §14.1.2 on well-formed single ranges', () => {
    fc.assert(
      fc.property(fc.option(fc.nat(5000), { nil: null }), fc.option(fc.nat(5000), { nil: null }), fc.integer({ min: 1, max: 4000 }), (a, b, n) => {
        fc.pre(a !== null || b !== null);
        const r = parseRange(`bytes=${a ?? ''}-${b ?? ''}`, n);
        if (a === null) {
          const suffix = b as number;
          expect(r).toEqual(suffix === 0 ? { kind: 'unsatisfiable' } : { kind: 'range', start: Math.max(0, n - suffix), end: n - 1 });
        } else if (b !== null && b < a) expect(r).toEqual({ kind: 'none' });
        else if (a >= n) expect(r).toEqual({ kind: 'unsatisfiable' });
        else expect(r).toEqual({ kind: 'range', start: a, end: Math.min(b ?? Infinity, n - 1) });
      }),
      { numRuns: 2000 },
    );
  });

  it('treats a missing header, several ranges and an empty representation as "send it all"', () => {
    expect(parseRange(undefined, 10)).toEqual({ kind: 'none' });
    expect(parseRange('bytes=0-1,3-4', 10)).toEqual({ kind: 'none' });
    expect(parseRange('bytes=0-', 0)).toEqual({ kind: 'none' });
  });
});

describe('parseRoute', () => {
  const segment = fc.oneof(fc.string({ maxLength: 20 }), fc.constantFrom('..', '.', '%2e%2e', '%2F', '%', 'v1', 'artifacts', 'models', 'manifest', '%00'), hex64);
  const target = fc.oneof(
    fc.string({ maxLength: 200 }),
    fc.array(segment, { maxLength: 7 }).map((s) => '/' + s.join('/')),
    fc.tuple(fc.string({ maxLength: 20 }), fc.string({ maxLength: 12 })).map(([n, v]) => `/v1/models/${n}/${v}/manifest`),
  );

  it('never throws, and whatever it returns names a file inside the artifact store', () => {
    const root = resolve('/srv/artifacts');
    fc.assert(
      fc.property(target, (t) => {
        const r = parseRoute(t);
        if (r === null) return;
        if (r.kind === 'artifact') {
          expect(r.sha256).toMatch(/^[0-9a-f]{64}$/);
          expect(resolve(join(root, r.sha256.slice(0, 2), r.sha256)).startsWith(root + sep)).toBe(true);
        } else if (r.kind === 'delta-offer' || r.kind === 'delta') {
          expect(r.target).toMatch(/^[0-9a-f]{64}$/);
          expect(r.kind === 'delta' ? r.patch : (r.base ?? 'a'.repeat(64))).toMatch(/^[0-9a-f]{64}$/);
        } else {
          expect(ID_PATTERN.test(r.name)).toBe(true);
          expect(Number.isInteger(r.version) && r.version >= 1 && r.version <= 2 ** 31 - 1).toBe(true);
        }
      }),
      { numRuns: 3000 },
    );
  });

  it('reads the routes it serves, percent-encoded or not, with or without a query', () => {
    fc.assert(
      fc.property(hex64, fc.string({ maxLength: 10 }), (sha, q) => {
        expect(parseRoute(`/v1/artifacts/${sha}?${encodeURIComponent(q)}`)).toEqual({ kind: 'artifact', sha256: sha });
      }),
    );
    expect(parseRoute('/v1/models/iris-v2/12/manifest')).toEqual({ kind: 'manifest', name: 'iris-v2', version: 12, base: null });
    expect(parseRoute('/v1/models/iris%2Dv2/12/manifest')).toEqual({ kind: 'manifest', name: 'iris-v2', version: 12, base: null });
    expect(parseRoute('/v1/models/iris/12/manifest?base=11')).toEqual({ kind: 'manifest', name: 'iris', version: 12, base: 11 });
    expect(parseRoute('/v1/models/iris/12/manifest?base=x')).toEqual({ kind: 'manifest', name: 'iris', version: 12, base: null });
    fc.assert(
      fc.property(hex64, hex64, fc.string({ maxLength: 80 }), (t, p, junk) => {
        expect(parseRoute(`/v1/deltas/${t}?base=${p}`)).toEqual({ kind: 'delta-offer', target: t, base: p });
        expect(parseRoute(`/v1/deltas/${t}/${p}`)).toEqual({ kind: 'delta', target: t, patch: p });
        const r = parseRoute(`/v1/deltas/${t}?base=${encodeURIComponent(junk)}`);
        expect(r).toEqual({ kind: 'delta-offer', target: t, base: /^[0-9a-f]{64}$/.test(junk) ? junk : null });
      }),
    );
    for (const bad of ['/v1/deltas/abc', `/v1/deltas/${'a'.repeat(64)}/../x`, `/v1/deltas/${'a'.repeat(64)}/${'a'.repeat(64)}/x`, '/v1/models/%2e%2e/1/manifest', '/v1/models/a%2Fb/1/manifest', '/v1/models/a/01/manifest', '/v1/models/a/2147483648/manifest', `/v1/artifacts/${'A'.repeat(64)}`]) {
      expect(parseRoute(bad), bad).toBeNull();
    }
  });
});

describe('noneMatch and parseBasicAuth', () => {
  it('never throw on any header', () => {
    fc.assert(
      fc.property(fc.option(fc.string({ maxLength: 300 }), { nil: undefined }), (h) => {
        expect(typeof noneMatch(h, '"abc"')).toBe('boolean');
        const cred = parseBasicAuth(h);
        if (cred) expect(cred.username.length).toBeGreaterThan(0);
      }),
      { numRuns: 2000 },
    );
  });

  it('read back any user:password, the password keeping its colons', () => {
    fc.assert(
      fc.property(fc.string({ minLength: 1, maxLength: 30 }).filter((u) => !u.includes(':')), fc.string({ maxLength: 60 }), (user, pass) => {
        fc.pre(Buffer.from(`${user}:${pass}`).toString('utf8') === `${user}:${pass}`);
        expect(parseBasicAuth(`Basic ${Buffer.from(`${user}:${pass}`).toString('base64')}`)).toEqual({ username: user, password: pass });
      }),
    );
  });
});
