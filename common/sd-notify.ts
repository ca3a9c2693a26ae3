import { createRequire } from 'node:module';
import { execFile } from 'node:child_process';
import type { Logger } from './log.js';

interface UnixDgramSocket {
  send(buf: Buffer, offset: number, length: number, path: string, cb?: (err?: Error) => void): void;
  on(event: 'error', cb: (err: Error) => void): void;
  close(): void;
}
interface UnixDgram {
  createSocket(type: 'unix_dgram'): UnixDgramSocket;
}

/**
 * The systemd notification protocol (sd_notify(3)): READY=1 once serving, WATCHDOG=1 at half of
 * WatchdogSec, STOPPING=1 when shutting down. Node has no AF_UNIX datagram sockets, so the
 * optional native `unix-dgram` module sends them; without it we fall back to `systemd-notify`,
 * which needs NotifyAccess=all in the unit (our units set it). Outside systemd (no NOTIFY_SOCKET)
 * everything here is a no-op.
 */
export class SdNotify {
  private readonly socketPath: string | undefined;
  private socket: UnixDgramSocket | null = null;
  private timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly log: Logger,
    private readonly env: NodeJS.ProcessEnv = process.env,
  ) {
    const p = env.NOTIFY_SOCKET;
    // An abstract socket is given with a leading '@' and addressed with a leading NUL.
    this.socketPath = p ? (p.startsWith('@') ? `\0${p.slice(1)}` : p) : undefined;
    if (this.socketPath) {
      try {
        const dgram = createRequire(import.meta.url)('unix-dgram') as UnixDgram;
        this.socket = dgram.createSocket('unix_dgram');
        this.socket.on('error', (err) => this.log.warn({ err }, 'sd_notify socket error'));
      } catch {
        this.log.info('unix-dgram not installed; using systemd-notify for sd_notify');
      }
    }
  }

  get enabled(): boolean {
    return this.socketPath !== undefined;
  }

  /** Half of WatchdogSec in ms, or null when systemd does not watch this process. */
  watchdogIntervalMs(): number | null {
    const usec = Number(this.env.WATCHDOG_USEC);
    if (!Number.isFinite(usec) || usec <= 0) return null;
    const pid = this.env.WATCHDOG_PID;
    if (pid !== undefined && Number(pid) !== process.pid) return null;
    return Math.max(1, Math.floor(usec / 2000));
  }

  notify(state: string): void {
    if (!this.socketPath) return;
    if (this.socket) {
      const buf = Buffer.from(state);
      this.socket.send(buf, 0, buf.length, this.socketPath, (err) => {
        if (err) this.log.warn({ err, state }, 'sd_notify failed');
      });
      return;
    }
    execFile('systemd-notify', [`--pid=${process.pid}`, ...state.split('\n')], (err) => {
      if (err) this.log.warn({ err, state }, 'systemd-notify failed');
    });
  }

  ready(status?: string): void {
    this.notify(status ? `READY=1\nSTATUS=${status}` : 'READY=1');
    const interval = this.watchdogIntervalMs();
    if (interval !== null && this.timer === null) {
      this.timer = setInterval(() => this.notify('WATCHDOG=1'), interval);
      this.timer.unref();
    }
  }

  stopping(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.notify('STOPPING=1');
  }

  close(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.socket?.close();
    this.socket = null;
  }
}
