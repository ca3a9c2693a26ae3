import { z } from 'zod';
import { ID_PATTERN, LOG_LEVELS, RECORD_CLASSES, type RecordClass } from '../proto/index.js';

const DAY = 86_400;
const MiB = 1024 * 1024;
/** Defaults sized for a Raspberry Pi's SD card: 64 MiB in all, events kept longest. */
const CLASS_DEFAULTS: Record<RecordClass, { maxBytes: number; maxAgeSec: number }> = {
  event: { maxBytes: 16 * MiB, maxAgeSec: 30 * DAY },
  health: { maxBytes: 8 * MiB, maxAgeSec: 30 * DAY },
  metric: { maxBytes: 16 * MiB, maxAgeSec: 7 * DAY },
  stats: { maxBytes: 16 * MiB, maxAgeSec: 7 * DAY },
  sample: { maxBytes: 16 * MiB, maxAgeSec: 2 * DAY },
};

/** The agent's configuration: one schema, defaults and descriptions; env EDGEFLEET_AGENT_<PATH>. */
export const AgentConfig = z
  .object({
    configVersion: z.literal(1).default(1).describe('version of this configuration format'),
    deviceId: z.string().regex(ID_PATTERN, 'letters, digits, ".", "_" or "-", at most 64').describe('this device’s id, as provisioned on the fleet'),
    stateDir: z.string().min(1).default('./agent-state').describe('where the agent keeps its state (systemd: StateDirectory)'),
    logLevel: z.enum(LOG_LEVELS).default('info').describe('log level until desired state sets one'),
    broker: z
      .object({
        url: z.string().regex(/^(mqtts?|tcp|tls|wss?):\/\//, 'an mqtt://, mqtts://, ws:// or wss:// URL').describe('the fleet’s MQTT broker'),
        username: z.string().optional().describe('broker user name (default: the device id)'),
        password: z.string().optional().describe('broker password (or passwordFile)'),
        passwordFile: z.string().optional().describe('file holding the broker password (systemd: LoadCredential)'),
        protocolVersion: z.union([z.literal(4), z.literal(5)]).default(4).describe('4 = MQTT 3.1.1, 5 = MQTT 5'),
        keepaliveSec: z.number().int().min(5).max(3600).default(30).describe('MQTT keepalive; the Last Will fires after 1.5 × this without traffic'),
        reconnectBaseMs: z.number().int().min(10).default(1000).describe('first reconnect delay ceiling; doubles per failed attempt (full jitter)'),
        reconnectCapMs: z.number().int().min(100).default(60_000).describe('largest reconnect delay ceiling'),
      })
      .strict(),
    runtimes: z
      .object({ probe: z.boolean().default(true).describe('load the inference runtimes at start-up and report which are usable') })
      .prefault({}),
    outbox: z
      .object({
        maxBytes: z
          .number()
          .int()
          .min(64 * 1024)
          .default(64 * 1024 * 1024)
          .describe('ceiling for everything waiting to be sent, in bytes (the database file stays within about twice this)'),
        synchronous: z
          .enum(['NORMAL', 'FULL'])
          .default('NORMAL')
          .describe('NORMAL survives a crash of the agent; FULL also a power cut, at a cost per commit (see README)'),
        classes: z
          .object(
            Object.fromEntries(
              RECORD_CLASSES.map((c) => [
                c,
                z
                  .object({
                    maxBytes: z.number().int().min(1024).default(CLASS_DEFAULTS[c].maxBytes).describe(`${c} records: byte ceiling`),
                    maxAgeSec: z.number().int().min(60).default(CLASS_DEFAULTS[c].maxAgeSec).describe(`${c} records: kept at most this long unsent`),
                  })
                  .prefault({}),
              ]),
            ) as Record<RecordClass, z.ZodPrefault<z.ZodObject<{ maxBytes: z.ZodDefault<z.ZodNumber>; maxAgeSec: z.ZodDefault<z.ZodNumber> }>>>,
          )
          .prefault({}),
        bytesPerSec: z.number().int().min(0).default(0).describe('cap on telemetry bytes per second for metered links (0: none)'),
        batchMaxRecords: z.number().int().min(1).max(5000).default(500).describe('records per telemetry batch'),
        metricsIntervalSec: z.number().int().min(1).default(60).describe('seconds between resource-usage metrics'),
        dropReportIntervalSec: z.number().int().min(1).default(60).describe('at most one `outbox.dropped` event per this many seconds'),
      })
      .prefault({}),
    models: z
      .object({
        artifactsUrl: z.string().regex(/^https?:\/\//, 'an http:// or https:// URL').optional().describe('the fleet’s artifact server (e.g. http://fleet.example:8780); without it no model is downloaded'),
        trustedKeys: z.array(z.string().regex(/^[A-Za-z0-9+/]{43}=$/, 'a raw Ed25519 public key, base64')).default([]).describe('fleet public keys (base64, as in fleet-key.pub) that may sign models'),
        trustedKeysFile: z.string().optional().describe('file with one fleet public key per line (the fleet’s fleet-key.pub)'),
        keepStable: z.number().int().min(1).max(20).default(3).describe('stable versions kept per model for local rollback'),
        maxModelBytes: z.number().int().min(1024).default(1024 * 1024 * 1024).describe('largest model version (all its files) the agent downloads'),
        maxAttempts: z.number().int().min(1).max(20).default(3).describe('restarts while a candidate runs (staging, shadow, activation, probation) before it is marked failed; downloads are retried with backoff and never counted'),
        childCheckTimeoutSec: z.number().min(1).default(120).describe('longest a candidate may take to load and run its golden vectors in the child process'),
        checkIntervalMs: z.number().int().min(10).default(1000).describe('milliseconds between health checks while a version is on probation'),
        delta: z.boolean().default(true).describe('ask the fleet for a patch against a file already held (or a compressed image) before downloading a whole model file'),
        deltaOfferTimeoutSec: z.number().min(1).default(120).describe('longest to wait for the fleet to compute a patch before downloading the whole file instead'),
      })
      .prefault({}),
    api: z
      .object({
        enabled: z.boolean().default(true).describe('serve the KServe v2 inference API'),
        host: z.string().default('127.0.0.1').describe('address the inference API listens on'),
        port: z.number().int().min(0).max(65_535).default(8700).describe('port of the inference API (0: any free port)'),
        socketPath: z.string().optional().describe('serve the inference API on this unix socket instead of TCP'),
        maxBodyBytes: z.number().int().min(1024).default(16 * 1024 * 1024).describe('largest inference request body'),
      })
      .prefault({}),
    feedback: z
      .object({
        recentRequests: z.number().int().min(1).default(10_000).describe('request ids remembered per model for feedback'),
        maxLabelsPerModel: z.number().int().min(1).default(10_000).describe('labels kept per model (oldest dropped)'),
        maxSamplesPerModel: z.number().int().min(1).default(10_000).describe('labelled samples kept per model for local training (oldest dropped); they never leave the device'),
        maxSampleAgeSec: z.number().int().min(60).default(30 * DAY).describe('labelled samples older than this are deleted'),
        recentInputBytes: z
          .number()
          .int()
          .min(0)
          .default(16 * MiB)
          .describe('memory per model for the inputs of recent requests, so that a label can make them a sample (oldest dropped first; 0: none)'),
      })
      .prefault({}),
    learner: z
      .object({
        enabled: z.boolean().default(true).describe('take part in the federated rounds the fleet invites this device to'),
        maxCpuLoad: z.number().min(0).max(1).default(0.8).describe('training stops when the cores are busier than this with other work (share of all cores)'),
        maxTemperatureC: z.number().default(80).describe('training stops above this CPU temperature, where the board has a sensor'),
        minBatteryPercent: z.number().min(0).max(100).default(30).describe('training stops below this battery charge while not charging, where there is a battery'),
        gateIntervalSec: z.number().min(0.1).default(5).describe('how often the resource gates are read while training'),
      })
      .prefault({}),
    shutdownTimeoutSec: z.number().min(1).default(10).describe('longest a graceful stop may take before the agent exits anyway'),
  })
  .strict()
  .superRefine(
    (c, ctx) => {
      // Also runs when other settings failed (see `when`), so `broker` may not be an object then.
      const broker = c.broker as Partial<typeof c.broker> | null | undefined;
      if (broker && typeof broker === 'object' && broker.password === undefined && broker.passwordFile === undefined) {
        ctx.addIssue({ code: 'custom', path: ['broker', 'password'], message: 'give broker.password or broker.passwordFile' });
      }
    },
    // Checked beside every other problem, so that all are reported at once.
    { when: (p) => typeof p.value === 'object' && p.value !== null },
  );
export type AgentConfig = z.infer<typeof AgentConfig>;
