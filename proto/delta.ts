/**
 * The edgefleet patch format ("EFDP", version 1): turns a base file into a target file,
 * bit-identical, and says how to check both. Specified in proto/README.md ("Patch format");
 * the reference decoder is `common/delta/apply.ts`.
 *
 *   header   fixed 96 bytes, little-endian, CRC-32 protected
 *   frames   PROGRAM | TENSOR frames, in target order, each producing the next target bytes
 *   END      one byte 0x00, then the CRC-32 of every frame byte before it
 *
 * Integers inside frames are unsigned LEB128 varints (at most 8 bytes, below 2^53).
 */

import { z } from 'zod';
import { Sha256 } from './model.js';

export const DELTA_MAGIC = 'EFDP';
export const DELTA_VERSION = 1;
export const DELTA_HEADER_BYTES = 96;

/** Header field offsets. */
export const HDR = {
  magic: 0, // 4 bytes "EFDP"
  version: 4, // u8
  flags: 5, // u8, 0 (no flags are defined; a set bit is refused)
  headerBytes: 6, // u16, 96
  baseSha256: 8, // 32 bytes; all zero for an image (a patch against the empty file)
  baseSize: 40, // u64
  targetSha256: 48, // 32 bytes
  targetSize: 80, // u64
  layout: 88, // u8, informational: what told the encoder where tensors are
  reserved: 89, // 3 bytes, zero
  crc32: 92, // u32, CRC-32 of bytes 0..91
} as const;

export const LAYOUT = { none: 0, onnx: 1, tfjs: 2 } as const;
export type LayoutKind = keyof typeof LAYOUT;

export const FRAME = { end: 0, program: 1, tensor: 2 } as const;

/** How a frame's or a plane's payload is stored. */
export const CODEC = { zero: 0, raw: 1, brotli: 2 } as const;
export type CodecName = keyof typeof CODEC;

/** Element types a TENSOR frame can carry, with their width in bytes. */
export const FLOAT = { f32: 1, f16: 2, bf16: 3, f64: 4 } as const;
export type FloatKind = keyof typeof FLOAT;
export const FLOAT_WIDTH: Record<FloatKind, number> = { f32: 4, f16: 2, bf16: 2, f64: 8 };

/**
 * How a TENSOR frame's planes relate to the base:
 *  - planes: the target elements themselves, split into byte planes (no base bytes read);
 *  - xor: target XOR base, per element;
 *  - sub: zigzag(target − base) of the elements' bit patterns as integers (not for f64).
 */
export const TENSOR_MODE = { planes: 0, xor: 1, sub: 2 } as const;
export type TensorMode = keyof typeof TENSOR_MODE;

/** Bounds the decoder enforces, so a hostile patch cannot make it allocate without limit. */
export const DELTA_LIMITS = {
  /** Decoded bytes of one PROGRAM frame. */
  maxProgramBytes: 4 * 1024 * 1024,
  /** Elements in one TENSOR frame. */
  maxTensorElements: 1024 * 1024,
} as const;

/** Elements per TENSOR frame the encoder writes (large tensors span several frames). */
export const TENSOR_CHUNK_ELEMENTS = 256 * 1024;
/** Decoded bytes per PROGRAM frame the encoder aims for. */
export const PROGRAM_CHUNK_BYTES = 1024 * 1024;

const Bytes = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);

/**
 * `GET /v1/deltas/{target}?base={sha256}`: how the fleet offers an artifact to a device holding
 * `base`. `patch`: a patch against that base; `image`: the target alone in the patch format
 * (compressed); `full`: neither is clearly smaller, download `/v1/artifacts/{target}`.
 */
export const DeltaOffer = z
  .object({
    kind: z.enum(['patch', 'image', 'full']),
    target: z.object({ sha256: Sha256, size: Bytes }).strict(),
    base: Sha256.nullable(),
    delta: z.object({ sha256: Sha256, size: Bytes }).strict().nullable(),
    sizes: z.object({ full: Bytes, image: Bytes.nullable(), patch: Bytes.nullable() }).strict(),
  })
  .strict()
  .refine((o) => (o.kind === 'full') === (o.delta === null), 'a patch or an image names its file; full names none')
  .refine((o) => (o.kind === 'patch') === (o.base !== null), 'a patch names its base; nothing else does');
export type DeltaOffer = z.infer<typeof DeltaOffer>;
