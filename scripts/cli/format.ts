/** Plain-text tables for humans; `--json` bypasses all of this. */
export function table(headers: string[], rows: (string | number | null | undefined)[][]): string {
  const cells = rows.map((r) => r.map((c) => (c === null || c === undefined ? '-' : String(c))));
  const widths = headers.map((h, i) => Math.max(h.length, ...cells.map((r) => (r[i] ?? '').length)));
  const line = (r: string[]): string => r.map((c, i) => c.padEnd(widths[i] ?? 0)).join('  ').trimEnd();
  return [line(headers), ...cells.map(line)].join('\n');
}

export function ago(ts: number | null, now = Date.now()): string {
  if (ts === null) return 'never';
  const s = Math.max(0, Math.round((now - ts) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.round(s / 60)}m ago`;
  if (s < 86_400) return `${Math.round(s / 3600)}h ago`;
  return `${Math.round(s / 86_400)}d ago`;
}

export function time(ts: number): string {
  return new Date(ts).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

export function bytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v.toFixed(u === 0 ? 0 : 1)} ${units[u]}`;
}

/** Seconds as an operator reads them: `45s`, `2m`, `1m30s`, `2h`, `3d4h`. */
export function duration(sec: number): string {
  const s = Math.max(0, Math.round(sec));
  const parts = (big: number, bigUnit: string, small: number, smallUnit: string): string => `${big}${bigUnit}${small > 0 ? `${small}${smallUnit}` : ''}`;
  if (s < 60) return `${s}s`;
  if (s < 3600) return parts(Math.floor(s / 60), 'm', s % 60, 's');
  if (s < 86_400) return parts(Math.floor(s / 3600), 'h', Math.floor((s % 3600) / 60), 'm');
  return parts(Math.floor(s / 86_400), 'd', Math.floor((s % 86_400) / 3600), 'h');
}

/** A share (0..1) as a percentage with at most `digits` decimals: `5%`, `27.3%`; `-` when there is none. */
export function pct(share: number | null | undefined, digits = 1): string {
  if (share === null || share === undefined || !Number.isFinite(share)) return '-';
  return `${Number((share * 100).toFixed(digits))}%`;
}
