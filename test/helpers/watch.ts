import type { WatchIo } from '../../scripts/cli/watch.js';

export type WatchRecorder<V> = WatchIo<V> & { out: string; err: string; polls: number };

/**
 * A `watch` command's I/O without a terminal or a fleet: each poll answers the next of `views`
 * (the last one again once they run out), output is collected, the clock stands at `now` and
 * sleeping takes no time.
 */
export function watchRecorder<V>(views: V[], now: number, opts: Partial<WatchIo<V>> = {}): WatchRecorder<V> {
  const r: WatchRecorder<V> = {
    out: '',
    err: '',
    polls: 0,
    show: (): Promise<V> => {
      r.polls++;
      return Promise.resolve(views[Math.min(r.polls - 1, views.length - 1)] as V);
    },
    stdout: (t: string) => void (r.out += t),
    stderr: (t: string) => void (r.err += t),
    tty: false,
    json: false,
    now: () => now,
    sleep: () => Promise.resolve(),
    ...opts,
  };
  return r;
}
