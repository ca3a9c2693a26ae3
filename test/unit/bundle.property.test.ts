import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { crc32 } from '../../common/delta/bytes.js';
import { mulberry32 } from '../../common/random.js';
import { BUNDLE_REJECT_REASONS, decodeBundle, encodeBundle, isEdgefleetError, type Bundle, type BundleLimits } from '../../proto/index.js';

/** Decodes, and fails the property on any throw that is not one of the two bundle errors with a known reason. */
function attempt(bytes: Uint8Array, limits?: Partial<BundleLimits>): Bundle | 'rejected' {
  try {
    return decodeBundle(bytes, limits);
  } catch (e) {
    if (!isEdgefleetError(e)) throw e;
    expect(['EF_BUNDLE_INVALID', 'EF_BUNDLE_TOO_LARGE']).toContain(e.code);
    expect(BUNDLE_REJECT_REASONS).toContain((e.details as { reason: string }).reason);
    return 'rejected';
  }
}

function reseal(bytes: Uint8Array): Buffer {
  const b = Buffer.from(bytes);
  if (b.length >= 4) b.writeUInt32LE(crc32(b.subarray(0, b.length - 4)), b.length - 4);
  return b;
}

const bits = (a: Float32Array) => Array.from(new Uint32Array(Float32Array.from(a).buffer));

const shapeArb = fc.array(fc.integer({ min: 0, max: 5 }), { maxLength: 4 });
const tensorsArb = fc.uniqueArray(fc.tuple(fc.string({ unit: 'binary', minLength: 1, maxLength: 20 }).filter((n) => !/\p{Cc}/u.test(n)), shapeArb), {
  selector: ([name]) => name,
  maxLength: 6,
});
const bundleArb = fc
  .tuple(tensorsArb, fc.integer({ min: 1, max: 2 ** 31 - 1 }), fc.dictionary(fc.string({ maxLength: 8 }), fc.jsonValue({ maxDepth: 3 }), { maxKeys: 4 }))
  .map(([specs, seed, meta]): Bundle => {
    const r = mulberry32(seed);
    // Values from every part of float32's range: ordinary, tiny, huge, -0, subnormal.
    const pick = () => [r() * 2 - 1, (r() - 0.5) * 1e-40, (r() - 0.5) * 6e38, -0, 1e-45][Math.floor(r() * 5)]!;
    return {
      tensors: specs.map(([name, shape]) => ({ name, shape, data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, pick) })),
      meta,
    };
  });

/** A copy at a given byteOffset inside a larger buffer, as MQTT hands payloads over. */
function at(offset: number, bytes: Uint8Array): Buffer {
  const b = Buffer.alloc(bytes.length + offset).subarray(offset);
  b.set(bytes);
  return b;
}

describe('bundle properties', () => {
  it('random bundles round-trip: float32 bit for bit, q8 within one step, at any byteOffset', () => {
    fc.assert(
      fc.property(bundleArb, fc.constantFrom('float32' as const, 'q8' as const), fc.nat({ max: 7 }), (bundle, encoding, offset) => {
        const out = decodeBundle(at(offset, encodeBundle(bundle, { encoding, random: mulberry32(offset + 1) })));
        expect(out.meta).toEqual(JSON.parse(JSON.stringify(bundle.meta)));
        expect(out.tensors.map((t) => [t.name, t.shape])).toEqual(bundle.tensors.map((t) => [t.name, t.shape]));
        out.tensors.forEach((t, i) => {
          const x = bundle.tensors[i]!.data;
          if (encoding === 'float32') return expect(bits(t.data)).toEqual(bits(x));
          let [min, max] = [Infinity, -Infinity];
          for (const v of x) [min, max] = [Math.min(min, v), Math.max(max, v)];
          const step = (max - min) / 255;
          x.forEach((v, j) => expect(Math.abs(t.data[j]! - v)).toBeLessThanOrEqual(step + Math.abs(v) * 2 ** -23 + 1e-45));
        });
      }),
      { numRuns: 300 },
    );
  });

  it('any bytes: decoding returns or throws a bundle error, nothing else', () => {
    fc.assert(
      // Random bytes rarely get past the magic: most runs put them behind a valid prefix and before a valid CRC.
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.option(fc.nat({ max: 400 }), { freq: 4 }), (body, headerBytes) => {
        if (headerBytes === null) return void attempt(body);
        const prefix = Buffer.from('4546544201000000' + '00000000', 'hex');
        prefix.writeUInt32LE(headerBytes % (body.length + 2), 8);
        attempt(reseal(Buffer.concat([prefix, body, Buffer.alloc(4)])));
      }),
      { numRuns: 500 },
    );
  });

  it('any header JSON and data in a well-formed container: a bundle error at worst', () => {
    // Mostly plausible entries (so that runs get past zod to the length, padding and value checks), some not.
    const entry = fc.oneof(
      { weight: 4, arbitrary: fc.record({ name: fc.constantFrom('a', 'b', 'c'), shape: fc.array(fc.nat({ max: 3 }), { maxLength: 3 }), encoding: fc.constant('float32') }) },
      {
        weight: 4,
        arbitrary: fc.record({
          name: fc.constantFrom('a', 'b', 'c'),
          shape: fc.array(fc.nat({ max: 3 }), { maxLength: 3 }),
          encoding: fc.constant('q8'),
          min: fc.oneof(fc.double({ noNaN: true, noDefaultInfinity: true }), fc.constant(3e38)),
          scale: fc.oneof(fc.double({ min: 0, noNaN: true, noDefaultInfinity: true }), fc.constant(1e37)),
        }),
      },
      {
        weight: 1,
        arbitrary: fc.record(
          { name: fc.oneof(fc.string({ maxLength: 4 }), fc.integer()), shape: fc.jsonValue(), encoding: fc.constantFrom('float32', 'q8', 'f16'), min: fc.double(), scale: fc.double() },
          { requiredKeys: [] },
        ),
      },
    );
    const headerArb = fc.oneof(
      { weight: 9, arbitrary: fc.record({ tensors: fc.array(entry, { maxLength: 3 }), meta: fc.oneof(fc.object(), fc.jsonValue()) }).map((h) => JSON.stringify(h)) },
      { weight: 1, arbitrary: fc.json() },
    );
    fc.assert(
      fc.property(headerArb, fc.uint8Array({ maxLength: 200 }), fc.boolean(), fc.nat({ max: 3 }), (json, random, sized, offset) => {
        const h = Buffer.from(json, 'utf8');
        let data = Buffer.from(random);
        if (sized) {
          // As many data bytes as the header asks for, when it can be read: the length check passes.
          try {
            const tensors = (JSON.parse(json) as { tensors: { shape: number[]; encoding: string }[] }).tensors;
            const need = tensors.reduce((n, t) => n + Math.ceil((t.shape.reduce((a, b) => a * b, 1) * (t.encoding === 'q8' ? 1 : 4)) / 4) * 4, 0);
            data = Buffer.concat([data, Buffer.alloc(Math.max(0, need))]).subarray(0, need);
          } catch {
            // not that shape of header: keep the random data
          }
        }
        const pad = Buffer.alloc(Math.ceil((12 + h.length) / 8) * 8 - 12 - h.length);
        const prefix = Buffer.from('4546544201000000' + '00000000', 'hex');
        prefix.writeUInt32LE(h.length, 8);
        attempt(at(offset, reseal(Buffer.concat([prefix, h, pad, data, Buffer.alloc(4)]))), { maxElements: 1000 });
      }),
      { numRuns: 500 },
    );
  });

  it('a valid bundle with any one byte changed is rejected, the CRC bytes included', () => {
    fc.assert(
      fc.property(bundleArb, fc.nat(), fc.integer({ min: 1, max: 255 }), (bundle, where, mask) => {
        const b = Buffer.from(encodeBundle(bundle));
        const i = where % b.length;
        b[i]! ^= mask;
        expect(attempt(b)).toBe('rejected');
      }),
      { numRuns: 500 },
    );
  });

  it('a valid bundle cut short anywhere is rejected', () => {
    fc.assert(
      fc.property(bundleArb, fc.nat(), (bundle, where) => {
        const b = encodeBundle(bundle);
        expect(attempt(b.subarray(0, where % b.length))).toBe('rejected');
      }),
      { numRuns: 500 },
    );
  });

  it('edits to a valid bundle that keep the CRC right reach the later checks, and still only bundle errors come out', () => {
    fc.assert(
      fc.property(bundleArb, fc.array(fc.tuple(fc.nat(), fc.nat({ max: 255 })), { minLength: 1, maxLength: 4 }), fc.nat({ max: 16 }), (bundle, edits, grow) => {
        const b = Buffer.concat([encodeBundle(bundle, { encoding: grow % 2 ? 'q8' : 'float32' }), Buffer.alloc(grow % 5 === 0 ? grow : 0)]);
        // Half the edits land in the data section (values, q8 padding); the rest anywhere after the prefix.
        const dataStart = Math.ceil((12 + b.readUInt32LE(8)) / 8) * 8;
        for (const [where, value] of edits) {
          const [from, to] = where % 2 && b.length - 4 > dataStart ? [dataStart, b.length - 4] : [12, b.length - 4];
          b[from + (where % (to - from))] = value;
        }
        attempt(reseal(b));
      }),
      { numRuns: 500 },
    );
  });
});
