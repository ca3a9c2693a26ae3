/**
 * Exponential backoff with full jitter: the n-th delay is uniform in [0, min(cap, base·2^n)].
 * Full jitter spreads a fleet that lost its broker at the same moment, so the broker is not hit by
 * every device at once when it returns (Brooker, "Exponential Backoff And Jitter", AWS, 2015).
 */
export class Backoff {
  private attempt = 0;

  constructor(
    private readonly baseMs: number,
    private readonly capMs: number,
    private readonly random: () => number = Math.random,
  ) {}

  next(): number {
    const ceiling = Math.min(this.capMs, this.baseMs * 2 ** Math.min(this.attempt, 30));
    this.attempt += 1;
    return Math.round(this.random() * ceiling);
  }

  reset(): void {
    this.attempt = 0;
  }

  get attempts(): number {
    return this.attempt;
  }
}
