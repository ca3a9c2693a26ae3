import { pbkdf2Sync, randomBytes, timingSafeEqual } from 'node:crypto';

/**
 * Credentials are 256-bit random tokens; the fleet stores only their hash, in Mosquitto's own
 * password-file format (`$7$iterations$salt$hash`, PBKDF2-SHA512) so that the same hash serves the
 * embedded broker and a generated Mosquitto password file. Key stretching buys nothing against a
 * random 256-bit secret, so we use Mosquitto's default iteration count and keep connects cheap for
 * fleets of many devices.
 */
const ITERATIONS = 101;
const SALT_BYTES = 12;
const HASH_BYTES = 64;

export function generateSecret(): string {
  return randomBytes(32).toString('base64url');
}

export function hashSecret(secret: string, iterations = ITERATIONS): string {
  const salt = randomBytes(SALT_BYTES);
  const hash = pbkdf2Sync(secret, salt, iterations, HASH_BYTES, 'sha512');
  return `$7$${iterations}$${salt.toString('base64')}$${hash.toString('base64')}`;
}

export function verifySecret(secret: string | Buffer, stored: string): boolean {
  const parts = stored.split('$');
  // ['', '7', iterations, salt, hash]
  if (parts.length !== 5 || parts[1] !== '7') return false;
  const iterations = Number(parts[2]);
  if (!Number.isInteger(iterations) || iterations < 1 || iterations > 1_000_000) return false;
  const salt = Buffer.from(parts[3] as string, 'base64');
  const expected = Buffer.from(parts[4] as string, 'base64');
  if (expected.length === 0) return false;
  const actual = pbkdf2Sync(secret, salt, iterations, expected.length, 'sha512');
  return timingSafeEqual(actual, expected);
}
