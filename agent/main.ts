#!/usr/bin/env node
import { parseArgs } from 'node:util';
import { EXIT } from '../proto/index.js';
import { loadConfig } from '../common/config.js';
import { createLogger } from '../common/log.js';
import { SdNotify } from '../common/sd-notify.js';
import { AgentConfig } from './config.js';
import { Agent } from './agent.js';

const USAGE = `edgefleet-agent [--config <file.json>] [--state-dir <dir>]

Runs the device agent. Settings come from the config file, then EDGEFLEET_AGENT_* environment
variables, then these flags. See README.md, "Configuration".`;

async function main(): Promise<number> {
  let args;
  try {
    args = parseArgs({
      options: { config: { type: 'string', short: 'c' }, 'state-dir': { type: 'string' }, help: { type: 'boolean', short: 'h' } },
      strict: true,
    }).values;
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n\n${USAGE}\n`);
    return EXIT.USAGE;
  }
  if (args.help) {
    process.stdout.write(USAGE + '\n');
    return EXIT.OK;
  }
  const loaded = loadConfig({
    schema: AgentConfig,
    file: args.config ?? process.env.EDGEFLEET_AGENT_CONFIG,
    envPrefix: 'EDGEFLEET_AGENT',
    // systemd's StateDirectory= is announced in STATE_DIRECTORY.
    overrides: { stateDir: args['state-dir'] ?? (process.env.EDGEFLEET_AGENT_STATE_DIR ? undefined : process.env.STATE_DIRECTORY) },
  });
  if (!loaded.ok) {
    process.stderr.write(`edgefleet-agent: invalid configuration:\n${loaded.errors.map((e) => `  - ${e}`).join('\n')}\n`);
    return EXIT.AGENT_CONFIG_INVALID;
  }
  const config = loaded.config;
  const log = createLogger('edgefleet-agent', config.logLevel).child({ deviceId: config.deviceId });
  const sd = new SdNotify(log.child({ component: 'systemd' }));
  const agent = new Agent(config, log);
  try {
    await agent.start();
  } catch (e) {
    log.fatal({ err: e }, 'agent failed to start');
    await agent.stop().catch(() => undefined);
    sd.close();
    const code = (e as NodeJS.ErrnoException).code;
    return code === 'EACCES' || code === 'EROFS' || code === 'ENOSPC' ? EXIT.AGENT_STATE_DIR : EXIT.AGENT_FATAL;
  }
  sd.ready('running');

  return new Promise<number>((resolve) => {
    let stopping = false;
    const shutdown = (signal: string): void => {
      if (stopping) return;
      stopping = true;
      log.info({ signal }, 'stopping');
      sd.stopping();
      const deadline = setTimeout(() => {
        log.warn('graceful stop took too long; exiting');
        resolve(EXIT.OK);
      }, config.shutdownTimeoutSec * 1000);
      agent
        .stop()
        .catch((err: unknown) => log.error({ err }, 'error while stopping'))
        .finally(() => {
          clearTimeout(deadline);
          sd.close();
          resolve(EXIT.OK);
        });
    };
    process.once('SIGTERM', () => shutdown('SIGTERM'));
    process.once('SIGINT', () => shutdown('SIGINT'));
  });
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`edgefleet-agent: ${(err as Error).stack ?? String(err)}\n`);
    process.exit(EXIT.AGENT_FATAL);
  },
);
