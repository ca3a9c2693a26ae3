/**
 * A real Mosquitto, started by a test with the configuration `edgefleet broker-config mosquitto`
 * generated, on a free port. Never 1883: that one is the machine's shared broker.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';
import { onCleanup } from './fleet.js';

export function mosquittoInstalled(): boolean {
  return spawnSync('mosquitto', ['-h'], { stdio: 'ignore' }).error === undefined;
}

export async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const addr = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  if (typeof addr !== 'object' || addr === null) throw new Error('no port');
  return addr.port;
}

export interface MosquittoHandle {
  pid: number;
  log(): string;
  /** SIGHUP: Mosquitto re-reads its password file and ACL. */
  reload(): void;
  stop(): Promise<void>;
}

/** Starts `mosquitto -c <conf>` and resolves once it listens. */
export async function startMosquitto(conf: string): Promise<MosquittoHandle> {
  const child: ChildProcess = spawn('mosquitto', ['-c', conf], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout?.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr?.on('data', (d: Buffer) => (output += d.toString()));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`mosquitto did not start:\n${output}`)), 10_000);
    const check = (): void => {
      if (/running/.test(output)) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout?.on('data', check);
    child.stderr?.on('data', check);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`mosquitto exited with ${code}:\n${output}`));
    });
  });
  const handle: MosquittoHandle = {
    pid: child.pid as number,
    log: () => output,
    reload: () => child.kill('SIGHUP'),
    stop: async () => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    },
  };
  onCleanup(() => handle.stop());
  return handle;
}
