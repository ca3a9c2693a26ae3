import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import jsonpatch from 'fast-json-patch';
import { z } from 'zod';
import { DesiredDoc, defaultDesiredDoc, desiredDigest, type DesiredMessage, type ResyncMessage } from '../../proto/index.js';
import { writeFileAtomic } from '../../common/files.js';

const Persisted = z.object({ version: z.number().int().nonnegative(), digest: z.string(), doc: DesiredDoc });

/** What a device holds of its desired state: the document, its version, and the digest that proves it. */
export type DesiredState = z.infer<typeof Persisted>;

/** Version 0, the defaults: what a device holds before the fleet has spoken. */
export function initialDesiredState(): DesiredState {
  const doc = defaultDesiredDoc();
  return { version: 0, digest: desiredDigest(doc), doc };
}

export type DesiredApplication =
  | { outcome: 'applied'; next: DesiredState; previous: DesiredDoc }
  | { outcome: 'stale' }
  | { outcome: 'resync'; reason: ResyncMessage['reason'] };

/**
 * The rules for one `down/desired` message, in order: a message at or below our version is stale
 * (a redelivery, or the retained copy of a patch we already applied); a full document replaces
 * ours; a patch from our version applies if it applies cleanly, validates, and yields the
 * announced digest; anything else asks for the full document.
 *
 * Pure: `state` is never modified (patches apply to a copy), so a caller that keeps `state` when
 * the outcome is not `applied` has changed nothing. The agent's store and the fleet simulator
 * (scripts/sim) both apply messages through this one function.
 */
export function applyDesiredMessage(state: DesiredState, msg: DesiredMessage): DesiredApplication {
  const target = msg.kind === 'full' ? msg.version : msg.to;
  if (target <= state.version) return { outcome: 'stale' };
  const previous = state.doc;
  if (msg.kind === 'full') {
    if (desiredDigest(msg.doc) !== msg.digest) return { outcome: 'resync', reason: 'digest-mismatch' };
    return { outcome: 'applied', next: { version: msg.version, digest: msg.digest, doc: msg.doc }, previous };
  }
  if (msg.from !== state.version) return { outcome: 'resync', reason: 'version-gap' };
  let next: unknown;
  try {
    next = jsonpatch.applyPatch(structuredClone(state.doc), msg.patch, true, false).newDocument;
  } catch {
    return { outcome: 'resync', reason: 'patch-failed' };
  }
  const parsed = DesiredDoc.safeParse(next);
  if (!parsed.success) return { outcome: 'resync', reason: 'patch-failed' };
  if (desiredDigest(parsed.data) !== msg.digest) return { outcome: 'resync', reason: 'digest-mismatch' };
  return { outcome: 'applied', next: { version: msg.to, digest: msg.digest, doc: parsed.data }, previous };
}

export type ApplyOutcome =
  | { outcome: 'applied'; version: number; previous: DesiredDoc }
  | { outcome: 'stale' }
  | { outcome: 'resync'; reason: ResyncMessage['reason'] };

/**
 * The device's copy of its desired state, kept in <stateDir>/desired.json (replaced atomically).
 * Version 0 means "nothing received yet": the defaults apply until the fleet speaks. Messages
 * apply by the rules of `applyDesiredMessage`; anything but `applied` leaves the state untouched.
 */
export class DesiredStore {
  private state: DesiredState;

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
    const result = applyDesiredMessage(this.state, msg);
    if (result.outcome !== 'applied') return result;
    this.commit(result.next);
    return { outcome: 'applied', version: result.next.version, previous: result.previous };
  }

  private commit(next: DesiredState): void {
    // Persist first: if the write fails, memory keeps the previous state too.
    writeFileAtomic(join(this.dir, 'desired.json'), JSON.stringify(next));
    this.state = next;
  }

  private load(): DesiredState {
    const file = join(this.dir, 'desired.json');
    if (!existsSync(file)) return initialDesiredState();
    try {
      const parsed = Persisted.safeParse(JSON.parse(readFileSync(file, 'utf8')));
      // An unreadable file (it cannot be torn: writes are atomic, but it can be edited by hand)
      // starts from version 0, which makes the first retained message a full resync.
      return parsed.success && desiredDigest(parsed.data.doc) === parsed.data.digest ? parsed.data : initialDesiredState();
    } catch {
      return initialDesiredState();
    }
  }
}
