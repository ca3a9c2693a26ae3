import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import jsonpatch from 'fast-json-patch';
import { z } from 'zod';
import { DesiredDoc, defaultDesiredDoc, desiredDigest, type DesiredMessage, type ResyncMessage } from '../../proto/index.js';
import { writeFileAtomic } from '../../common/files.js';

const Persisted = z.object({ version: z.number().int().nonnegative(), digest: z.string(), doc: DesiredDoc });
type Persisted = z.infer<typeof Persisted>;

export type ApplyOutcome =
  | { outcome: 'applied'; version: number; previous: DesiredDoc }
  | { outcome: 'stale' }
  | { outcome: 'resync'; reason: ResyncMessage['reason'] };

/**
 * The device's copy of its desired state, kept in <stateDir>/desired.json (replaced atomically).
 * Version 0 means "nothing received yet": the defaults apply until the fleet speaks.
 *
 * Rules, in order: a message at or below our version is stale (a redelivery, or the retained copy
 * of a patch we already applied); a full document replaces ours; a patch from our version applies
 * if it applies cleanly, validates, and yields the announced digest; anything else asks for the
 * full document and leaves the current state untouched.
 */
export class DesiredStore {
  private state: Persisted;

  constructor(private readonly dir: string) {
    this.state = this.load();
  }

  get version(): number {
    return this.state.version;
  }

  get doc(): DesiredDoc {
    return this.state.doc;
  }

  apply(msg: DesiredMessage): ApplyOutcome {
    const target = msg.kind === 'full' ? msg.version : msg.to;
    if (target <= this.state.version) return { outcome: 'stale' };
    const previous = this.state.doc;
    if (msg.kind === 'full') {
      if (desiredDigest(msg.doc) !== msg.digest) return { outcome: 'resync', reason: 'digest-mismatch' };
      this.commit({ version: msg.version, digest: msg.digest, doc: msg.doc });
      return { outcome: 'applied', version: msg.version, previous };
    }
    if (msg.from !== this.state.version) return { outcome: 'resync', reason: 'version-gap' };
    let next: unknown;
    try {
      next = jsonpatch.applyPatch(structuredClone(this.state.doc), msg.patch, true, false).newDocument;
    } catch {
      return { outcome: 'resync', reason: 'patch-failed' };
    }
    const parsed = DesiredDoc.safeParse(next);
    if (!parsed.success) return { outcome: 'resync', reason: 'patch-failed' };
    if (desiredDigest(parsed.data) !== msg.digest) return { outcome: 'resync', reason: 'digest-mismatch' };
    this.commit({ version: msg.to, digest: msg.digest, doc: parsed.data });
    return { outcome: 'applied', version: msg.to, previous };
  }

  private commit(next: Persisted): void {
    // Persist first: if the write fails, memory keeps the previous state too.
    writeFileAtomic(join(this.dir, 'desired.json'), JSON.stringify(next));
    this.state = next;
  }

  private load(): Persisted {
    const file = join(this.dir, 'desired.json');
    const fresh = (): Persisted => {
      const doc = defaultDesiredDoc();
      return { version: 0, digest: desiredDigest(doc), doc };
    };
    if (!existsSync(file)) return fresh();
    try {
      const parsed = Persisted.safeParse(JSON.parse(readFileSync(file, 'utf8')));
      // An unreadable file (it cannot be torn: writes are atomic, but it can be edited by hand)
      // starts from version 0, which makes the first retained message a full resync.
      return parsed.success && desiredDigest(parsed.data.doc) === parsed.data.digest ? parsed.data : fresh();
    } catch {
      return fresh();
    }
  }
}
