import type { Logger } from './log.js';

/**
 * Counts refused inbound messages by (reason, source) and logs each pair once, then at most one
 * summary per `summaryIntervalMs` for everything refused since: a flood of garbage costs a counter
 * increment per message, not a log line.
 */
export class RejectCounter {
  private readonly totals = new Map<string, number>();
  private readonly seen = new Set<string>();
  private suppressed = 0;
  private lastSummary = 0;

  constructor(
    private readonly log: Logger,
    private readonly summaryIntervalMs = 60_000,
    private readonly now: () => number = Date.now,
  ) {}

  reject(code: string, source: string, detail: Record<string, unknown> = {}): void {
    this.totals.set(code, (this.totals.get(code) ?? 0) + 1);
    const key = `${code}\u0000${source}`;
    if (!this.seen.has(key)) {
      // The set is bounded so that a flood from many sources cannot grow it without limit.
      if (this.seen.size < 10_000) this.seen.add(key);
      this.log.warn({ code, source, ...detail }, 'inbound message rejected');
      return;
    }
    this.suppressed += 1;
    const t = this.now();
    if (t - this.lastSummary >= this.summaryIntervalMs) {
      this.lastSummary = t;
      this.log.warn({ suppressed: this.suppressed, totals: this.snapshot() }, 'inbound messages still being rejected');
      this.suppressed = 0;
    }
  }

  snapshot(): Record<string, number> {
    return Object.fromEntries(this.totals);
  }

  total(): number {
    let n = 0;
    for (const v of this.totals.values()) n += v;
    return n;
  }
}
