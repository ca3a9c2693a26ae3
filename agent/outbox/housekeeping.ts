import type { Logger } from '../../common/log.js';
import { RECORD_CLASSES, type RecordClass } from '../../proto/index.js';
import type { OutboxStore } from './store.js';

/**
 * Expires records past their age, and reports (as an `outbox.dropped` event) what the bounds
 * dropped since the last report. Returns the drop counts now, to pass back next time.
 */
export function outboxHousekeeping(
  outbox: OutboxStore,
  reported: Record<RecordClass, number> | null,
  log: Logger,
  track: (p: Promise<unknown>) => void,
): Record<RecordClass, number> | null {
  try {
    outbox.expire();
    const now = outbox.droppedCounts();
    const prev = reported ?? now;
    const since: Partial<Record<RecordClass, number>> = {};
    for (const c of RECORD_CLASSES) if (now[c] > prev[c]) since[c] = now[c] - prev[c];
    if (Object.keys(since).length === 0) return reported ?? now;
    log.warn({ dropped: since }, 'outbox over its bounds; oldest records of the lowest priority dropped');
    track(outbox.enqueue('event', 'outbox.dropped', { since, total: now }));
    return now;
  } catch (err) {
    log.error({ err }, 'outbox housekeeping failed');
    return reported;
  }
}
