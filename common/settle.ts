/**
 * Waits for `promises` to settle, but no longer than `ms`. A stop must drain what it can and then
 * go on: a publish waiting for a PUBACK from a broker that went away may never settle.
 */
export async function settleWithin(promises: Iterable<Promise<unknown>>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
  const settled = Promise.allSettled([...promises]).then(() => true as const);
  try {
    return await Promise.race([settled, timeout]);
  } finally {
    clearTimeout(timer);
  }
}
