import type { DownKind, UpKind } from './topics.js';

/**
 * Largest payload accepted per topic, in bytes. Both sides reject anything larger before parsing
 * it, so one misbehaving peer cannot make a daemon allocate without bound.
 */
export const MAX_PAYLOAD_BYTES: Record<UpKind | DownKind | 'opsRequest' | 'opsReply', number> = {
  status: 1024,
  facts: 64 * 1024,
  reported: 256 * 1024,
  resync: 1024,
  telemetry: 512 * 1024,
  fl: 16 * 1024,
  /** A federated update: a tensor bundle in a binary frame. The round's model decides the real bound (its size plus the header). */
  update: 64 * 1024 * 1024,
  candidate: 64 * 1024 * 1024,
  ack: 64 * 1024,
  desired: 256 * 1024,
  opsRequest: 256 * 1024,
  opsReply: 16 * 1024 * 1024,
};
