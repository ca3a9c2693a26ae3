import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { EdgefleetError, manifestSha256, modelRef, verifySignedManifest, type SignedManifest } from '../../proto/index.js';
import { writeFileAtomic } from '../../common/files.js';

const LearnedKeys = z.array(z.string().regex(/^[A-Za-z0-9+/]{43}=$/)).max(64);

/** What a candidate is checked against, besides the signature. */
export interface Admission {
  name: string;
  version: number;
  /** The manifest desired state names, when it names one. */
  manifestSha256?: string | undefined;
  floor: number;
  stable: readonly number[];
  maxModelBytes: number;
  now: number;
}

/**
 * The device's trust in what the fleet sends: the fleet keys it was provisioned with, the keys
 * those endorsed since (learned from manifests' key chains and kept in `trusted-keys.json`), and
 * the rules a candidate version must pass before anything of it is downloaded.
 */
export class Trust {
  private readonly keys: string[];
  private readonly file: string;

  constructor(
    root: string,
    private readonly provisioned: readonly string[],
    private readonly onLearned: (count: number) => void = () => undefined,
  ) {
    this.file = join(root, 'trusted-keys.json');
    this.keys = [...new Set([...provisioned, ...this.readLearned()])];
  }

  /** Throws EF_SIGNATURE_INVALID unless a trusted key (or one it endorsed) signed the manifest. */
  verify(signed: SignedManifest): void {
    const { learnedKeys } = verifySignedManifest(signed, this.keys);
    if (learnedKeys.length === 0) return;
    this.keys.push(...learnedKeys);
    writeFileAtomic(this.file, JSON.stringify(this.keys.filter((k) => !this.provisioned.includes(k))), 0o600);
    this.onLearned(learnedKeys.length);
  }

  /**
   * Everything checked before a byte of the files is fetched: that it is the version asked for,
   * its signature, the manifest desired state names, the size cap, expiry, and the version floor
   * (a version below it only from this device's own stable history: a local rollback).
   */
  admit(signed: SignedManifest, a: Admission): void {
    const m = signed.manifest;
    const ref = modelRef(m.name, m.version);
    if (m.name !== a.name || m.version !== a.version) throw new EdgefleetError('EF_MODEL_INVALID', `asked for ${modelRef(a.name, a.version)}, got ${ref}`);
    this.verify(signed);
    if (a.manifestSha256 && manifestSha256(signed) !== a.manifestSha256) throw new EdgefleetError('EF_SIGNATURE_INVALID', `${ref}: manifest is not the one desired state names`);
    const bytes = m.files.reduce((n, f) => n + f.size, 0);
    if (bytes > a.maxModelBytes) throw new EdgefleetError('EF_ARTIFACT_TOO_LARGE', `${ref} is ${bytes} bytes, above this device’s cap of ${a.maxModelBytes}`);
    if (m.expiresAt !== null && m.expiresAt <= a.now) throw new EdgefleetError('EF_MODEL_EXPIRED', `${ref} expired at ${new Date(m.expiresAt).toISOString()}`);
    if (m.version < a.floor && !a.stable.includes(m.version)) throw new EdgefleetError('EF_DOWNGRADE_REFUSED', `${ref} is below this device’s floor ${a.floor}`);
  }

  /** Learned keys; an unreadable file counts as none (the provisioned keys still stand). */
  private readLearned(): string[] {
    if (!existsSync(this.file)) return [];
    try {
      const parsed = LearnedKeys.safeParse(JSON.parse(readFileSync(this.file, 'utf8')));
      return parsed.success ? parsed.data : [];
    } catch {
      return [];
    }
  }
}
