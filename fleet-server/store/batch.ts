import type { FleetStore } from './types.js';

/**
 * Group commit for the writes that arrive one message at a time (device reports, publication
 * marks). Work queued in the same turn of the event loop runs in one transaction at the next
 * `setImmediate`: ten thousand reports cost a handful of commits instead of ten thousand. If a
 * piece throws, that transaction is rolled back whole and every piece runs again in a transaction
 * of its own, so the one that throws changes nothing and rejects only its own promise. (A savepoint
 * per piece would do the same at twice the cost of the common case.) Callers await their piece:
 * once it resolves, it is committed.
 */
export class WriteBatcher {
  private queue: { fn: () => unknown; resolve: (v: unknown) => void; reject: (e: unknown) => void }[] = [];
  private scheduled = false;

  constructor(private readonly store: FleetStore) {}

  run<T>(fn: () => T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.queue.push({ fn, resolve: resolve as (v: unknown) => void, reject });
      if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(() => this.flush());
      }
    });
  }

  private flush(): void {
    this.scheduled = false;
    const batch = this.queue;
    this.queue = [];
    let results: unknown[];
    try {
      results = this.store.transaction(() => batch.map((item) => item.fn()));
    } catch {
      // One by one: each commits or rolls back alone.
      for (const item of batch) {
        try {
          item.resolve(this.store.transaction(item.fn));
        } catch (e) {
          item.reject(e);
        }
      }
      return;
    }
    batch.forEach((item, i) => item.resolve(results[i]));
  }
}
