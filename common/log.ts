import { Writable } from 'node:stream';
import { pino, type Logger, type LoggerOptions } from 'pino';

export type { Logger };

/**
 * Paths redacted from every log line, wherever they appear one or two levels deep. Credentials
 * travel through config and operator replies; none of them may reach the journal.
 */
const REDACT = [
  'password',
  '*.password',
  '*.*.password',
  'secret',
  '*.secret',
  'credential.password',
  'token',
  '*.token',
  'authorization',
  '*.authorization',
];

/** JSON lines on stdout (journald picks them up); one child per component via `log.child({component})`. */
export function createLogger(name: string, level: string = process.env.EDGEFLEET_LOG_LEVEL ?? 'info', options: LoggerOptions = {}): Logger {
  return pino({
    name,
    level,
    redact: { paths: REDACT, censor: '[redacted]' },
    base: { pid: process.pid },
    timestamp: pino.stdTimeFunctions.isoTime,
    ...options,
  });
}

/**
 * A logger that prints nothing, for tests and library callers that bring none. Its output goes
 * nowhere, so it stays quiet even when a daemon raises the level (desired state may set one).
 */
export function silentLogger(): Logger {
  return pino({ level: 'silent' }, new Writable({ write: (_chunk, _enc, cb) => cb() }));
}
