#!/usr/bin/env node
import { parseArgs } from 'node:util';
import { EXIT, isEdgefleetError } from '../proto/index.js';
import { loadConfig } from '../common/config.js';
import { createLogger } from '../common/log.js';
import { SdNotify } from '../common/sd-notify.js';
import { ServerConfig } from './config.js';
import { FleetServer } from './server.js';

const USAGE = `edgefleet-server [--config <file.json>] [--data-dir <dir>] [--port <n>]

Runs the fleet server. Settings come from the config file, then EDGEFLEET_SERVER_* environment
variables, then these flags. See README.md, "Configuration".`;

async function main(): Promise<number> {
  let args;
  try {
    args = parseArgs({
      options: {
        config: { type: 'string', short: 'c' },
        'data-dir': { type: 'string' },
        port: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
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
    schema: ServerConfig,
    file: args.config ?? process.env.EDGEFLEET_SERVER_CONFIG,
    envPrefix: 'EDGEFLEET_SERVER',
    overrides: { dataDir: args['data-dir'], 'broker.port': args.port === undefined ? undefined : Number(args.port) },
  });
  if (!loaded.ok) {
    process.stderr.write(`edgefleet-server: invalid configuration:\n${loaded.errors.map((e) => `  - ${e}`).join('\n')}\n`);
    return EXIT.SERVER_CONFIG_INVALID;
  }
  const config = loaded.config;
  const log = createLogger('edgefleet-server', config.logLevel);
  const sd = new SdNotify(log.child({ component: 'systemd' }));
  const server = new FleetServer(config, log);
  try {
    await server.start();
  } catch (e) {
    await server.stop();
    sd.close();
    if (isEdgefleetError(e) && e.code === 'EF_PORT_IN_USE') {
      process.stderr.write(
        `edgefleet-server: ${e.message}.\n  Choose other ports with --port <n> or EDGEFLEET_SERVER_BROKER_PORT=<n> (the broker) and EDGEFLEET_SERVER_ARTIFACTS_PORT=<n> (the artifact server); 0 picks a free one.\n`,
      );
      return EXIT.SERVER_PORT_IN_USE;
    }
    if (isEdgefleetError(e) && e.code === 'EF_CONFIG_INVALID') {
      process.stderr.write(`edgefleet-server: ${e.message}\n`);
      return EXIT.SERVER_CONFIG_INVALID;
    }
    log.fatal({ err: e }, 'fleet server failed to start');
    return (e as { code?: string }).code?.startsWith('SQLITE') ? EXIT.SERVER_DATABASE : EXIT.SERVER_FATAL;
  }
  sd.ready(`serving on ${server.brokerUrl}`);

  return new Promise<number>((resolve) => {
    let stopping = false;
    const shutdown = (signal: string): void => {
      if (stopping) return;
      stopping = true;
      log.info({ signal }, 'stopping');
      sd.stopping();
      server
        .stop()
        .then(() => resolve(EXIT.OK))
        .catch((err: unknown) => {
          log.error({ err }, 'error while stopping');
          resolve(EXIT.SERVER_FATAL);
        })
        .finally(() => sd.close());
    };
    process.once('SIGTERM', () => shutdown('SIGTERM'));
    process.once('SIGINT', () => shutdown('SIGINT'));
  });
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`edgefleet-server: ${(err as Error).stack ?? String(err)}\n`);
    process.exit(EXIT.SERVER_FATAL);
  },
);
