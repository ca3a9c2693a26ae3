export * from './topics.js';
export * from './errors.js';
export * from './codec.js';
export * from './limits.js';
export * from './desired.js';
export * from './device.js';
export * from './ops.js';
export * from './telemetry.js';
