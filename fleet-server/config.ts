import { z } from 'zod';
import { LOG_LEVELS, MAX_ARTIFACT_FILE_BYTES } from '../proto/index.js';

/** The fleet server's configuration: one schema, defaults and descriptions; env EDGEFLEET_SERVER_<PATH>. */
export const ServerConfig = z
  .object({
    configVersion: z.literal(1).default(1).describe('version of this configuration format'),
    dataDir: z.string().min(1).default('./data').describe('database, broker persistence, keys and the local CLI profile'),
    logLevel: z.enum(LOG_LEVELS).default('info').describe('log level'),
    broker: z
      .object({
        mode: z.enum(['embedded', 'external']).default('embedded').describe('run the embedded aedes broker, or connect to an external one'),
        host: z.string().default('127.0.0.1').describe('embedded broker: address to listen on (0.0.0.0 for every interface)'),
        port: z
          .number()
          .int()
          .min(0)
          .max(65_535)
          .default(18_830)
          .describe('embedded broker: TCP port (0 picks a free one); not 1883, so it can sit beside a system broker'),
        url: z.string().optional().describe('external broker URL, e.g. mqtt://broker.example:1883'),
        publicUrl: z.string().optional().describe('broker URL handed to devices with their credentials (default: derived from host and port, or url)'),
        username: z.string().default('fleet').describe('identity of the fleet server on the broker'),
        password: z.string().optional().describe('password of that identity (default: generated and kept in <dataDir>/fleet.secret)'),
        protocolVersion: z.union([z.literal(4), z.literal(5)]).default(4).describe('MQTT protocol of the fleet connection: 4 = 3.1.1, 5 = MQTT 5'),
        maxPayloadBytes: z.number().int().min(1024).default(1024 * 1024).describe('embedded broker: largest message a device or operator may publish'),
        maxUpdateBytes: z
          .number()
          .int()
          .min(1024)
          .max(64 * 1024 * 1024)
          .default(32 * 1024 * 1024)
          .describe('embedded broker: largest federated update a device may publish (up/update); size it to the largest trainable model'),
        connectWaitSec: z.number().min(0).default(10).describe('how long start-up waits for the first broker connection before going on without it'),
        mosquittoConfigDir: z
          .string()
          .optional()
          .describe('external Mosquitto: rewrite edgefleet.passwd and edgefleet.acl here whenever a credential is issued or revoked'),
        mosquittoReloadCommand: z.string().optional().describe('command run after rewriting them, e.g. "systemctl reload mosquitto"'),
      })
      .prefault({}),
    artifacts: z
      .object({
        host: z
          .string()
          .default('127.0.0.1')
          .describe('artifact server (model files and manifests over HTTP): address to listen on; 0.0.0.0 so that devices elsewhere can download'),
        port: z.number().int().min(0).max(65_535).default(8780).describe('artifact server: TCP port (0 picks a free one)'),
        publicUrl: z.string().optional().describe('artifact server URL for devices and the CLI profile (default: derived from host and port)'),
        maxFileBytes: z
          .number()
          .int()
          .min(1)
          .max(MAX_ARTIFACT_FILE_BYTES)
          .default(1024 * 1024 * 1024)
          .describe('largest artifact file an operator may upload'),
        authCacheSec: z
          .number()
          .min(0)
          .max(3600)
          .default(60)
          .describe('how long a verified HTTP credential is remembered before its hash is checked again (0: on every request)'),
      })
      .prefault({}),
    delta: z
      .object({
        enabled: z.boolean().default(true).describe('offer devices delta patches (and compressed images) of model files instead of whole files'),
        minSavings: z
          .number()
          .min(0)
          .max(0.9)
          .default(0.1)
          .describe('a patch is served only if at least this share smaller than the compressed image, and the image only if this much smaller than the file'),
        cacheMaxBytes: z
          .number()
          .int()
          .min(0)
          .default(2 * 1024 * 1024 * 1024)
          .describe('computed patches kept on disk (<dataDir>/deltas), least recently served dropped first'),
      })
      .prefault({}),
    signing: z
      .object({
        keyFile: z
          .string()
          .optional()
          .describe('fleet signing key, Ed25519 PEM, mode 0600 (default: <dataDir>/fleet-key.pem, created on first start; rotate with `edgefleet key rotate`)'),
      })
      .prefault({}),
    rollouts: z
      .object({
        intervalMs: z
          .number()
          .int()
          .min(50)
          .max(60_000)
          .default(1000)
          .describe('how often rollouts are reconciled on a timer (pauses, windows, timeouts); device reports also reconcile at once'),
      })
      .prefault({}),
    publishPendingIntervalSec: z.number().min(1).default(30).describe('how often desired state the broker may not hold is published again'),
    telemetry: z
      .object({
        retentionDays: z.number().positive().default(30).describe('telemetry records older than this (by arrival) are removed'),
        maxRecordsPerDevice: z.number().int().min(1).default(100_000).describe('per device, only the newest this many telemetry records are kept'),
        pruneIntervalSec: z.number().min(1).default(300).describe('how often retention runs'),
      })
      .prefault({}),
  })
  .strict()
  .superRefine(
    (c, ctx) => {
      // Also runs when other settings failed (see `when`), so `broker` may not be an object then.
      const broker = c.broker as Partial<typeof c.broker> | null | undefined;
      if (broker && typeof broker === 'object' && broker.mode === 'external' && !broker.url) {
        ctx.addIssue({ code: 'custom', path: ['broker', 'url'], message: 'an external broker needs a url' });
      }
    },
    // Checked beside every other problem, so that all are reported at once.
    { when: (p) => typeof p.value === 'object' && p.value !== null },
  );
export type ServerConfig = z.infer<typeof ServerConfig>;
