import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { writeFileAtomic } from '../../common/files.js';

/**
 * A counter raised before every connect and kept across restarts, so that every MQTT session of
 * this device has a larger number than the last (device clocks can't be trusted for that: a Pi
 * without a battery-backed clock boots in the past).
 */
export class SessionCounter {
  private value: number;
  private readonly file: string;

  constructor(dir: string) {
    this.file = join(dir, 'session');
    const raw = existsSync(this.file) ? Number(readFileSync(this.file, 'utf8').trim()) : 0;
    this.value = Number.isSafeInteger(raw) && raw >= 0 ? raw : 0;
  }

  get current(): number {
    return this.value;
  }

  next(): number {
    this.value += 1;
    writeFileAtomic(this.file, `${this.value}\n`);
    return this.value;
  }
}
