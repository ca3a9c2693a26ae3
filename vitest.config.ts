import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Process tests run the compiled executables, exactly as a device would; build them first.
    globalSetup: ['test/global-setup.ts'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // Suites start real brokers and processes; two cores do not like many at once. `npm test` runs
    // the 1,000-device rollout suite on its own after the rest: beside the TF.js training suites its
    // devices' reports arrived too late for its waves (three of ten not in 45 s) in two CI runs of four.
    fileParallelism: true,
    maxWorkers: 2,
  },
});
