import { setTimeout as sleep } from 'node:timers/promises';

/**
 * The watch loop `rollout watch` and `fl watch` share: poll a view, redraw it in place on a terminal
 * (or print a block only when it changes, or one JSON line per change), until it is final or the
 * operator interrupts.
 */

/** Exit code of a watch the operator interrupted (Ctrl-C), as a shell reports SIGINT. */
export const WATCH_INTERRUPTED = 130;

export interface WatchIo<V> {
  show(): Promise<V>;
  stdout(text: string): void;
  stderr(text: string): void;
  /** Redraw in place (ANSI) when stdout is a terminal; otherwise print a block only when it changes. */
  tty: boolean;
  columns?: number | undefined;
  json: boolean;
  now(): number;
  /** Resolves after `ms`, or at once when `signal` aborts. */
  sleep(ms: number, signal: AbortSignal): Promise<void>;
}

/** What is watched: how to tell two views apart, draw one, and end. */
export interface Watched<V> {
  /** The view as compared in JSON mode: without what changes on every poll. */
  key(v: V): string;
  /** The block drawn; `now` is given on a terminal (for countdowns). */
  render(v: V, now?: number): string;
  /** For a final view: prints its last words and gives the exit code. Null while it runs. */
  finish(v: V, io: Pick<WatchIo<V>, 'stdout' | 'stderr' | 'json'>): number | null;
  /** What to say when the operator stops watching (`seen`: the last view, if any). */
  stopped(seen: V | null): string;
}

/** Polls until the view is final (or `signal` aborts, e.g. on Ctrl-C) and returns the exit code. */
export async function watchView<V>(io: WatchIo<V>, intervalMs: number, signal: AbortSignal, w: Watched<V>): Promise<number> {
  const interrupted = new Promise<null>((resolve) => {
    if (signal.aborted) resolve(null);
    signal.addEventListener('abort', () => resolve(null), { once: true });
  });
  let last: string | null = null;
  let seen: V | null = null;
  let drawnLines = 0;
  if (io.tty && !io.json) io.stdout('\x1b[?25l');
  try {
    for (;;) {
      const pending = io.show();
      // Abandoned on Ctrl-C: its rejection (the client closing) is nobody's business then.
      pending.catch(() => undefined);
      const v = await Promise.race([pending, interrupted]);
      if (v === null) break;
      seen = v;
      if (io.json) {
        const key = w.key(v);
        if (key !== last) io.stdout(JSON.stringify(v) + '\n');
        last = key;
      } else if (io.tty) {
        const cols = io.columns ?? 0;
        const block = w.render(v, io.now()).split('\n').map((l) => (cols > 1 && l.length >= cols ? l.slice(0, cols - 1) : l));
        // Up to the first line of the previous block, then clear to the end of the screen (ECMA-48 CUU, ED).
        io.stdout(`${drawnLines > 0 ? `\x1b[${drawnLines}A\r\x1b[J` : ''}${block.join('\n')}\n`);
        drawnLines = block.length;
      } else {
        const block = w.render(v);
        if (block !== last) io.stdout(`${last === null ? '' : '\n'}${block}\n`);
        last = block;
      }
      const code = w.finish(v, io);
      if (code !== null) return code;
      await io.sleep(intervalMs, signal);
      if (signal.aborted) break;
    }
  } finally {
    if (io.tty && !io.json) io.stdout('\x1b[?25h');
  }
  io.stderr(`edgefleet: stopped watching${w.stopped(seen)}\n`);
  return WATCH_INTERRUPTED;
}

/** The io of a watch in this process's terminal (or pipe). */
export function processWatchIo<V>(show: () => Promise<V>, json: boolean): WatchIo<V> {
  return {
    show,
    stdout: (t) => void process.stdout.write(t),
    stderr: (t) => void process.stderr.write(t),
    tty: process.stdout.isTTY === true,
    columns: process.stdout.columns,
    json,
    now: Date.now,
    sleep: (ms, signal) => sleep(ms, undefined, { signal }).catch(() => undefined),
  };
}
