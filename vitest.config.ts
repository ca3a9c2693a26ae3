import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Process tests run the compiled executables, exactly as a device would; build them first.
    globalSetup: ['test/global-setup.ts'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // Suites start real brokers and processes; two cores do not like many at once.
    fileParallelism: true,
    maxWorkers: 2,
  },
});
