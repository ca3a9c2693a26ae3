import { describe, expect, it } from 'vitest';
import { crc32 } from '../../common/delta/bytes.js';
import { mulberry32 } from '../../common/random.js';
import {
  BUNDLE_REJECT_REASONS,
  DEFAULT_BUNDLE_LIMITS,
  decodeBundle,
  dequantizeQ8,
  encodeBundle,
  isEdgefleetError,
  quantizeQ8,
  type Bundle,
  type BundleLimits,
  type BundleRejectReason,
} from '../../proto/index.js';

/** What decoding (or encoding) came to: 'ok', or the error's code and reason. */
function outcome(f: () => unknown): string {
  try {
    f();
    return 'ok';
  } catch (e) {
    if (!isEdgefleetError(e)) throw e;
    const reason = (e.details as { reason: BundleRejectReason }).reason;
    expect(BUNDLE_REJECT_REASONS).toContain(reason);
    return `${e.code} ${reason}`;
  }
}
const invalid = (reason: BundleRejectReason) => `EF_BUNDLE_INVALID ${reason}`;
const TOO_LARGE = 'EF_BUNDLE_TOO_LARGE too-large';

function decodes(bytes: Uint8Array, limits?: Partial<BundleLimits>): string {
  return outcome(() => decodeBundle(bytes, limits));
}

/** Rewrites the trailer so the CRC matches: lets a test reach the checks that come after it. */
function reseal(bytes: Uint8Array): Buffer {
  const b = Buffer.from(bytes);
  b.writeUInt32LE(crc32(b.subarray(0, b.length - 4)), b.length - 4);
  return b;
}

interface RawParts {
  version?: number;
  flags?: number;
  reserved?: number;
  headerBytes?: number;
  headerPad?: number[];
}

/** A bundle built by hand from header text and data bytes, with a correct CRC. */
function assemble(header: string | Uint8Array, data: Uint8Array, p: RawParts = {}): Buffer {
  const h = typeof header === 'string' ? Buffer.from(header, 'utf8') : Buffer.from(header);
  const padTo = Math.ceil((12 + h.length) / 8) * 8;
  const pad = Buffer.alloc(padTo - 12 - h.length);
  Buffer.from(p.headerPad ?? []).copy(pad);
  const prefix = Buffer.alloc(12);
  prefix.write('EFTB', 0, 'latin1');
  prefix[4] = p.version ?? 1;
  prefix[5] = p.flags ?? 0;
  prefix.writeUInt16LE(p.reserved ?? 0, 6);
  prefix.writeUInt32LE(p.headerBytes ?? h.length, 8);
  return reseal(Buffer.concat([prefix, h, pad, data, Buffer.alloc(4)]));
}

function f32(...values: number[]): Uint8Array {
  return new Uint8Array(Float32Array.from(values).buffer);
}

function header(tensors: unknown[], meta: unknown = {}): string {
  return JSON.stringify({ tensors, meta });
}

const bits = (a: Float32Array) => Array.from(new Uint32Array(Float32Array.from(a).buffer));

const sample: Bundle = {
  tensors: [
    { name: 'dense/kernel', shape: [2, 3], data: Float32Array.of(0.5, -1.25, 3e-39, -0, 3.4028234663852886e38, -1e-7) },
    { name: 'dense/bias', shape: [3], data: Float32Array.of(1, 2, 3) },
  ],
  meta: { kind: 'fl-update', roundId: 7, nested: { a: [1, 'x', null, true] } },
};

describe('round trips', () => {
  it('float32 is bit-for-bit, -0 and subnormals included, and meta comes back as sent', () => {
    const out = decodeBundle(encodeBundle(sample));
    expect(out.meta).toEqual(sample.meta);
    expect(out.tensors.map((t) => [t.name, t.shape])).toEqual(sample.tensors.map((t) => [t.name, t.shape]));
    out.tensors.forEach((t, i) => expect(bits(t.data)).toEqual(bits(sample.tensors[i]!.data)));
  });

  it('q8 stays within one quantization step of every value, and is about a quarter of the size', () => {
    const r = mulberry32(1);
    const data = Float32Array.from({ length: 1000 }, () => (r() - 0.3) * 4);
    const bundle: Bundle = { tensors: [{ name: 'w', shape: [10, 100], data }], meta: {} };
    const bytes = encodeBundle(bundle, { encoding: 'q8', random: mulberry32(2) });
    expect(bytes.length).toBeLessThan(encodeBundle(bundle).length / 3);
    const back = decodeBundle(bytes).tensors[0]!.data;
    let min = Infinity;
    let max = -Infinity;
    for (const v of data) [min, max] = [Math.min(min, v), Math.max(max, v)];
    const scale = (max - min) / 255;
    for (let i = 0; i < data.length; i++) expect(Math.abs(back[i]! - data[i]!)).toBeLessThanOrEqual(scale + Math.abs(data[i]!) * 2 ** -23);
  });

  it('a constant tensor is exact in q8 (scale 0)', () => {
    const data = new Float32Array(7).fill(-0.1);
    const bytes = encodeBundle({ tensors: [{ name: 'c', shape: [7], data }], meta: {} }, { encoding: 'q8' });
    expect(bits(decodeBundle(bytes).tensors[0]!.data)).toEqual(bits(data));
  });

  it.each(['float32', 'q8'] as const)('scalars and empty tensors (%s)', (encoding) => {
    const bundle: Bundle = {
      tensors: [
        { name: 'scalar', shape: [], data: Float32Array.of(2.5) },
        { name: 'empty', shape: [0], data: new Float32Array(0) },
        { name: 'empty-3d', shape: [3, 0, 2], data: new Float32Array(0) },
        { name: 'odd', shape: [5], data: Float32Array.of(1, 2, 3, 4, 5) },
      ],
      meta: {},
    };
    const out = decodeBundle(encodeBundle(bundle, { encoding }));
    expect(out.tensors.map((t) => [t.name, t.shape, t.data.length])).toEqual(bundle.tensors.map((t) => [t.name, t.shape, t.data.length]));
    // A scalar is a constant tensor, exact in q8 too; [1..5] has a q8 step of 4/255.
    expect(out.tensors[0]!.data[0]).toBe(2.5);
    out.tensors[3]!.data.forEach((v, i) => expect(Math.abs(v - (i + 1))).toBeLessThanOrEqual(encoding === 'q8' ? 4 / 255 : 0));
  });

  it('no tensors at all', () => {
    expect(decodeBundle(encodeBundle({ tensors: [], meta: { a: 1 } }))).toEqual({ tensors: [], meta: { a: 1 } });
  });
});

describe('q8 is unbiased', () => {
  // Each x sits at a different fraction of a step, so rounding to nearest (or any fixed rounding) is off by
  // up to half a step. Stochastic rounding's mean over K draws is within 6 standard errors (σ ≤ scale/2 per
  // draw). The PRNG is seeded, so the outcome is fixed: the test cannot flake.
  const x = Float32Array.from([-1, 1, ...Array.from({ length: 30 }, (_, i) => -1 + (2 * (i + 0.3)) / 31)]);
  const K = 4000;
  const tolerance = (scale: number) => (6 * scale) / (2 * Math.sqrt(K));

  function worstBias(random: () => number): { bias: number; scale: number } {
    const sum = new Float64Array(x.length);
    let scale = 0;
    for (let k = 0; k < K; k++) {
      const q = quantizeQ8(x, random);
      scale = q.scale;
      const d = dequantizeQ8(q.q, q.min, q.scale);
      for (let i = 0; i < x.length; i++) sum[i]! += d[i]!;
    }
    let bias = 0;
    for (let i = 0; i < x.length; i++) bias = Math.max(bias, Math.abs(sum[i]! / K - x[i]!));
    return { bias, scale };
  }

  it('the mean over many encodings of the same tensor is the tensor', () => {
    const { bias, scale } = worstBias(mulberry32(42));
    expect(bias).toBeLessThan(tolerance(scale));
  });

  it('the same check catches rounding to nearest (so it has the power to fail)', () => {
    const { bias, scale } = worstBias(() => 0.5);
    expect(bias).toBeGreaterThan(tolerance(scale));
  });
});

describe('golden bytes (the format cannot drift silently)', () => {
  it('float32: prefix, header, padding to 8, data, CRC', () => {
    const bytes = encodeBundle({
      tensors: [
        { name: 'w', shape: [2], data: Float32Array.of(1, -2) },
        { name: 's', shape: [], data: Float32Array.of(0.5) },
      ],
      meta: { k: 1 },
    });
    const json = '{"tensors":[{"name":"w","shape":[2],"encoding":"float32"},{"name":"s","shape":[],"encoding":"float32"}],"meta":{"k":1}}';
    expect(json.length).toBe(0x77);
    const expected = Buffer.concat([
      Buffer.from('45465442' + '01' + '00' + '0000' + '77000000', 'hex'), // "EFTB", v1, flags, reserved, H = 119
      Buffer.from(json, 'latin1'), // ends at 131
      Buffer.from('0000000000', 'hex'), // to 136, a multiple of 8
      Buffer.from('0000803f' + '000000c0' + '0000003f', 'hex'), // 1, -2, 0.5 as f32 LE
      Buffer.from('dc152a34', 'hex'), // CRC-32 of bytes 0..147, LE
    ]);
    expect(bytes.toString('hex')).toBe(expected.toString('hex'));
  });

  it('q8: min and scale in the header, one byte per element, padded to 4', () => {
    const bytes = encodeBundle({ tensors: [{ name: 'q', shape: [3], data: Float32Array.of(0, 1, 0.5) }], meta: {} }, { encoding: 'q8', random: () => 0.25 });
    const json = '{"tensors":[{"name":"q","shape":[3],"encoding":"q8","min":0,"scale":0.00392156862745098}],"meta":{}}';
    const expected = Buffer.concat([
      Buffer.from('4546544201000000' + '64000000', 'hex'), // H = 100: 12 + 100 is already a multiple of 8
      Buffer.from(json, 'latin1'),
      Buffer.from('00ff7f' + '00', 'hex'), // floor(0 + .25), floor(255 + .25), floor(127.5 + .25); pad
      Buffer.from('7f3e311d', 'hex'),
    ]);
    expect(bytes.toString('hex')).toBe(expected.toString('hex'));
  });
});

describe('zero copy where the input allows it', () => {
  it('an aligned input gives views on its buffer', () => {
    const bytes = encodeBundle(sample);
    const out = decodeBundle(bytes);
    expect(out.tensors[0]!.data.buffer).toBe(bytes.buffer);
  });

  it('a Buffer at byteOffset 1 (as MQTT slices arrive) decodes into copies', () => {
    const enc = encodeBundle(sample);
    const odd = Buffer.alloc(enc.length + 1).subarray(1);
    enc.copy(odd);
    expect(odd.byteOffset % 4).not.toBe(0);
    const out = decodeBundle(odd);
    expect(out.tensors[0]!.data.buffer).not.toBe(odd.buffer);
    out.tensors.forEach((t, i) => expect(bits(t.data)).toEqual(bits(sample.tensors[i]!.data)));
  });
});

describe('limits', () => {
  const bytes = encodeBundle(sample); // 2 tensors, 9 elements
  it.each<[Partial<BundleLimits>, string]>([
    [{ maxBytes: bytes.length }, 'ok'],
    [{ maxBytes: bytes.length - 1 }, TOO_LARGE],
    [{ maxTensors: 2 }, 'ok'],
    [{ maxTensors: 1 }, TOO_LARGE],
    [{ maxElements: 9 }, 'ok'],
    [{ maxElements: 8 }, TOO_LARGE],
    [{ maxBytes: undefined, maxElements: undefined }, 'ok'],
  ])('%j → %s', (limits, expected) => expect(decodes(bytes, limits)).toBe(expected));

  it('the defaults are 64 MiB, 4096 tensors, 16 Mi elements', () => {
    expect(DEFAULT_BUNDLE_LIMITS).toEqual({ maxBytes: 64 * 2 ** 20, maxTensors: 4096, maxElements: 16 * 2 ** 20 });
  });

  it('elements are counted before anything is allocated: a huge shape in a tiny bundle is refused as too large', () => {
    expect(decodes(assemble(header([{ name: 'x', shape: [2 ** 30, 2 ** 20], encoding: 'q8', min: 0, scale: 1 }]), new Uint8Array(0)))).toBe(TOO_LARGE);
  });
});

describe('every rejection reason', () => {
  const good = encodeBundle(sample);
  const one = header([{ name: 'a', shape: [1], encoding: 'float32' }]);
  const edit = (f: (b: Buffer) => void) => {
    const b = Buffer.from(good);
    f(b);
    return b;
  };

  it.each<[string, Uint8Array, string]>([
    ['shorter than the smallest bundle', good.subarray(0, 19), invalid('truncated')],
    ['empty', new Uint8Array(0), invalid('truncated')],
    ['header length past the end', edit((b) => b.writeUInt32LE(b.length, 8)), invalid('truncated')],
    ['magic', edit((b) => (b[3] = 0x58)), invalid('magic')],
    ['unknown version', assemble(one, f32(1), { version: 2 }), invalid('version')],
    ['flags', assemble(one, f32(1), { flags: 1 }), invalid('flags')],
    ['reserved', assemble(one, f32(1), { reserved: 0x100 }), invalid('reserved')],
    ['header length 0', edit((b) => b.writeUInt32LE(0, 8)), invalid('header')],
    ['header length over 64 KiB', assemble('{}'.padEnd(65537, ' '), new Uint8Array(0)), invalid('header')],
    ['a flipped data bit', edit((b) => (b[b.length - 10]! ^= 0x10)), invalid('checksum')],
    ['a wrong CRC', edit((b) => (b[b.length - 1]! ^= 1)), invalid('checksum')],
    ['not JSON', assemble('{"tensors":[', f32()), invalid('header')],
    ['not UTF-8', assemble(Uint8Array.of(0x7b, 0xff, 0x7d), f32()), invalid('header')],
    ['a byte order mark', assemble('\ufeff' + header([]), f32()), invalid('header')],
    ['nested too deep', assemble(header([], { a: JSON.parse('['.repeat(70) + ']'.repeat(70)) as unknown }), f32()), invalid('header')],
    ['an unknown key', assemble(JSON.stringify({ tensors: [], meta: {}, extra: 1 }), f32()), invalid('header')],
    ['meta missing', assemble(JSON.stringify({ tensors: [] }), f32()), invalid('header')],
    ['meta an array', assemble(header([], []), f32()), invalid('header')],
    ['duplicate names', assemble(header([{ name: 'a', shape: [], encoding: 'float32' }, { name: 'a', shape: [], encoding: 'float32' }]), f32(1, 2)), invalid('header')],
    ['an empty name', assemble(header([{ name: '', shape: [], encoding: 'float32' }]), f32(1)), invalid('header')],
    ['a 257-character name', assemble(header([{ name: 'n'.repeat(257), shape: [], encoding: 'float32' }]), f32(1)), invalid('header')],
    ['a control character in a name', assemble(header([{ name: 'a\nb', shape: [], encoding: 'float32' }]), f32(1)), invalid('header')],
    ['nine dimensions', assemble(header([{ name: 'a', shape: Array(9).fill(1), encoding: 'float32' }]), f32(1)), invalid('header')],
    ['a negative dimension', assemble(header([{ name: 'a', shape: [-1], encoding: 'float32' }]), f32()), invalid('header')],
    ['a fractional dimension', assemble(header([{ name: 'a', shape: [1.5], encoding: 'float32' }]), f32()), invalid('header')],
    ['an unknown encoding', assemble(header([{ name: 'a', shape: [1], encoding: 'f16' }]), f32(1)), invalid('header')],
    ['q8 without scale', assemble(header([{ name: 'a', shape: [1], encoding: 'q8', min: 0 }]), Uint8Array.of(0, 0, 0, 0)), invalid('header')],
    ['q8 with a negative scale', assemble(header([{ name: 'a', shape: [1], encoding: 'q8', min: 0, scale: -1 }]), Uint8Array.of(0, 0, 0, 0)), invalid('header')],
    ['float32 with min and scale', assemble(header([{ name: 'a', shape: [1], encoding: 'float32', min: 0, scale: 1 }]), f32(1)), invalid('header')],
    ['data shorter than the header says', assemble(one, f32()), invalid('length')],
    ['data longer than the header says', assemble(one, f32(1, 2)), invalid('length')],
    ['trailing junk', reseal(Buffer.concat([good, Buffer.alloc(4)])), invalid('length')],
    ['a nonzero byte after the header', assemble(header([]) + ' ', f32(), { headerPad: [0, 1] }), invalid('padding')],
    ['a nonzero byte after a q8 tensor', assemble(header([{ name: 'a', shape: [1], encoding: 'q8', min: 0, scale: 1 }]), Uint8Array.of(7, 0, 9, 0)), invalid('padding')],
    ['NaN', assemble(one, f32(NaN)), invalid('non-finite')],
    ['+Infinity', assemble(one, f32(Infinity)), invalid('non-finite')],
    ['-Infinity among finite values', assemble(header([{ name: 'a', shape: [3], encoding: 'float32' }]), f32(1, -Infinity, 2)), invalid('non-finite')],
    ['q8 that overflows float32', assemble(header([{ name: 'a', shape: [1], encoding: 'q8', min: 3e38, scale: 1e37 }]), Uint8Array.of(255, 0, 0, 0)), invalid('non-finite')],
  ])('%s', (_, bytes, expected) => expect(decodes(bytes)).toBe(expected));

  it('a well-formed hand-built bundle decodes (so the cases above fail for their one fault)', () => {
    expect(decodes(assemble(one, f32(1)))).toBe('ok');
    expect(decodes(assemble(header([{ name: 'a', shape: [1], encoding: 'q8', min: 0, scale: 1 }]), Uint8Array.of(7, 0, 0, 0)))).toBe('ok');
    expect(decodes(assemble(header([]) + ' ', f32()))).toBe('ok');
  });

  it('too many tensors (4096 cannot fit in a 64 KiB header, so a lower cap shows it)', () => {
    const many = assemble(header(Array.from({ length: 1000 }, (_, i) => ({ name: `${i}`, shape: [0], encoding: 'float32' }))), f32());
    expect(decodes(many, { maxTensors: 1000 })).toBe('ok');
    expect(decodes(many, { maxTensors: 999 })).toBe(TOO_LARGE);
  });

  it('too large beats every other fault: the cap is checked before anything is read', () => {
    expect(decodes(new Uint8Array(100), { maxBytes: 99 })).toBe(TOO_LARGE);
  });
});

describe('the encoder refuses what the decoder would', () => {
  const t = (name: string, shape: number[], data: number[]) => ({ name, shape, data: Float32Array.from(data) });
  it.each<[string, Bundle, string]>([
    ['NaN', { tensors: [t('a', [2], [1, NaN])], meta: {} }, invalid('non-finite')],
    ['Infinity', { tensors: [t('a', [], [Infinity])], meta: {} }, invalid('non-finite')],
    ['data shorter than the shape', { tensors: [t('a', [2, 2], [1, 2, 3])], meta: {} }, invalid('shape')],
    ['a scalar with two values', { tensors: [t('a', [], [1, 2])], meta: {} }, invalid('shape')],
    ['a negative dimension', { tensors: [t('a', [-1], [])], meta: {} }, invalid('shape')],
    ['nine dimensions', { tensors: [t('a', Array<number>(9).fill(1), [1])], meta: {} }, invalid('shape')],
    ['duplicate names', { tensors: [t('a', [], [1]), t('a', [], [2])], meta: {} }, invalid('header')],
    ['an empty name', { tensors: [t('', [], [1])], meta: {} }, invalid('header')],
    ['a control character in a name', { tensors: [t('a\u0000', [], [1])], meta: {} }, invalid('header')],
    ['meta with a BigInt', { tensors: [], meta: { n: 1n } }, invalid('header')],
    ['meta nested too deep', { tensors: [], meta: JSON.parse('{"a":' + '['.repeat(70) + ']'.repeat(70) + '}') as Record<string, unknown> }, invalid('header')],
    ['meta an array', { tensors: [], meta: [] as unknown as Record<string, unknown> }, invalid('header')],
    ['a header over 64 KiB', { tensors: Array.from({ length: 300 }, (_, i) => t(`${i}`.padStart(256, 'x'), [0], [])), meta: {} }, TOO_LARGE],
  ])('%s', (_, bundle, expected) => {
    expect(outcome(() => encodeBundle(bundle))).toBe(expected);
    expect(outcome(() => encodeBundle(bundle, { encoding: 'q8' }))).toBe(expected);
  });
});
