import { createRequire } from 'node:module';
import { Readable } from 'node:stream';
import type { Level } from 'level';
import type { Logger } from '../../common/log.js';

/**
 * Retained-message reads of the embedded broker, replacing aedes-persistence-level's two methods:
 *
 * - **Range, not scan.** The library walks every retained message for every SUBSCRIBE and tests
 *   each against the filter. A device subscribes to `.../dev/{id}/down/+`, so after a fleet restart
 *   a thousand reconnecting devices read a million messages. Here each filter reads only the keys
 *   under its literal prefix (the part before the first wildcard): one device's own messages.
 * - **Safe to stop.** aedes pipes the stream without an error handler; a read still running when
 *   the broker stops and the database closes would throw from the stream and take the process
 *   down. Every stream gets a handler, and `drain()` waits for the open ones before the close.
 *
 * Keys and values are the library's own (`retained:{topic}`, msgpack), so data written by either
 * version reads the same.
 */
const RETAINED = 'retained:';

const libraryRequire = createRequire(createRequire(import.meta.url).resolve('aedes-persistence-level'));
const msgpack = libraryRequire('msgpack-lite') as { decode(b: Buffer): RetainedPacket };

interface RetainedPacket {
  topic: string;
  [k: string]: unknown;
}

/** MQTT topic filter matching (MQTT-4.7): `+` one level, `#` the rest (and the parent level). */
export function topicMatches(filter: string, topic: string): boolean {
  const f = filter.split('/');
  const t = topic.split('/');
  // Filters starting with a wildcard do not match topics starting with `$` (MQTT-4.7.2-1).
  if (topic.startsWith('$') && (f[0] === '+' || f[0] === '#')) return false;
  for (let i = 0; i < f.length; i++) {
    const level = f[i];
    if (level === '#') return true;
    if (i >= t.length) return false;
    if (level !== '+' && level !== t[i]) return false;
  }
  return f.length === t.length;
}

/**
 * The literal part of a filter before its first wildcard: every topic it matches starts with it.
 * Before a `#` the separator goes too, since `a/#` also matches `a` (MQTT-4.7.1-2).
 */
export function literalPrefix(filter: string): string {
  const i = filter.search(/[+#]/);
  if (i < 0) return filter;
  return filter[i] === '#' && i > 0 ? filter.slice(0, i - 1) : filter.slice(0, i);
}

/** The smallest string above every string that starts with `prefix`. */
function upperBound(prefix: string): string {
  return prefix + '\uffff';
}

export interface RetainedReads {
  /** Ends every retained read still open and resolves once each has let go of the database (or after `timeoutMs`). */
  drain(timeoutMs?: number): Promise<void>;
}

export function installRetainedReads(
  persistence: { createRetainedStreamCombi(patterns: string[]): Readable; createRetainedStream(pattern: string): Readable },
  db: Level<string, Buffer>,
  log: Logger,
): RetainedReads {
  const open = new Set<Readable>();

  async function* read(patterns: readonly string[]): AsyncGenerator<RetainedPacket> {
    const seen = new Set<string>();
    for (const pattern of patterns) {
      const prefix = RETAINED + literalPrefix(pattern);
      for await (const blob of db.values({ gte: prefix, lt: upperBound(prefix), valueEncoding: 'buffer' })) {
        const packet = msgpack.decode(blob);
        if (seen.has(packet.topic) || !topicMatches(pattern, packet.topic)) continue;
        seen.add(packet.topic);
        yield packet;
      }
    }
  }

  const stream = (patterns: readonly string[]): Readable => {
    const s = Readable.from(read(patterns));
    open.add(s);
    s.on('error', (err) => log.debug({ err: err.message }, 'retained read ended early'));
    s.on('close', () => open.delete(s));
    return s;
  };
  persistence.createRetainedStreamCombi = (patterns) => stream(patterns);
  persistence.createRetainedStream = (pattern) => stream([pattern]);

  return {
    async drain(timeoutMs = 2000) {
      const closed = [...open].map((s) => new Promise<void>((resolve) => {
        s.once('close', () => resolve());
        s.destroy();
      }));
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([Promise.all(closed), new Promise<void>((r) => (timer = setTimeout(r, timeoutMs)))]);
      clearTimeout(timer);
    },
  };
}
