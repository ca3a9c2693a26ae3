#!/usr/bin/env node
/**
 * `npm run docs`: rewrites the configuration tables in README.md from the daemons' schemas, between
 * the `<!-- config:server -->` and `<!-- config:agent -->` markers. test/unit/docs.test.ts fails
 * when they differ.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { describeConfig } from '../common/config.js';
import { ServerConfig } from '../fleet-server/config.js';
import { AgentConfig } from '../agent/config.js';

let readme = readFileSync('README.md', 'utf8');
for (const [marker, table] of [
  ['config:server', describeConfig(ServerConfig, 'EDGEFLEET_SERVER')],
  ['config:agent', describeConfig(AgentConfig, 'EDGEFLEET_AGENT')],
] as const) {
  const start = readme.indexOf(`<!-- ${marker} -->`);
  const end = readme.indexOf(`<!-- /${marker} -->`);
  if (start < 0 || end < 0) throw new Error(`README.md lacks the ${marker} markers`);
  readme = `${readme.slice(0, start)}<!-- ${marker} -->\n${table}\n${readme.slice(end)}`;
}
writeFileSync('README.md', readme);
