import { expect } from 'vitest';
import type { TensorRange } from '../../common/delta/index.js';
import { FLOAT_WIDTH } from '../../proto/delta.js';

/** The invariants every tensor layout promises its callers: in order, inside the file, not overlapping, whole float elements, unique names. */
export function expectValidLayout(ranges: TensorRange[], fileSize: number): void {
  let end = 0;
  const names = new Set<string>();
  for (const r of ranges) {
    expect(Number.isSafeInteger(r.offset) && Number.isSafeInteger(r.length)).toBe(true);
    expect(r.length).toBeGreaterThan(0);
    expect(r.offset).toBeGreaterThanOrEqual(end);
    expect(r.offset + r.length).toBeLessThanOrEqual(fileSize);
    if (r.float !== null) expect(r.length % FLOAT_WIDTH[r.float]).toBe(0);
    expect(names.has(r.name)).toBe(false);
    names.add(r.name);
    end = r.offset + r.length;
  }
}
