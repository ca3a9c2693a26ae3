import { z } from 'zod';
import { ID_PATTERN, LOG_LEVELS } from '../proto/index.js';

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
    shutdownTimeoutSec: z.number().min(1).default(10).describe('longest a graceful stop may take before the agent exits anyway'),
  })
  .strict()
  .superRefine((c, ctx) => {
    if (c.broker.password === undefined && c.broker.passwordFile === undefined) {
      ctx.addIssue({ code: 'custom', path: ['broker', 'password'], message: 'give broker.password or broker.passwordFile' });
    }
  });
export type AgentConfig = z.infer<typeof AgentConfig>;
