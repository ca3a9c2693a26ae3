/**
 * The documents a user reads stay in step with the code: every error code, topic and operator
 * method is in proto/README.md; every setting is in README.md, as `describeConfig` renders it.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { DOWN_KINDS, ERRORS, EXIT, METHODS, UP_KINDS, topics } from '../../proto/index.js';
import { describeConfig } from '../../common/config.js';
import { ServerConfig } from '../../fleet-server/config.js';
import { AgentConfig } from '../../agent/config.js';

const protoReadme = readFileSync('proto/README.md', 'utf8');
const readme = readFileSync('README.md', 'utf8');

function between(text: string, marker: string): string {
  const start = text.indexOf(`<!-- ${marker} -->`);
  const end = text.indexOf(`<!-- /${marker} -->`);
  expect(start, `README.md lacks <!-- ${marker} -->`).toBeGreaterThanOrEqual(0);
  return text.slice(start + marker.length + 9, end).trim();
}

describe('proto/README.md', () => {
  it('lists every error code with the catalog’s meaning, and no other', () => {
    const rows = [...protoReadme.matchAll(/^\| `(EF_[A-Z_]+)` \| (.+) \|$/gm)].map((m) => [m[1], m[2]]);
    expect(Object.fromEntries(rows)).toEqual({ ...ERRORS });
  });

  it('lists every topic', () => {
    for (const kind of UP_KINDS) expect(protoReadme).toContain(`\`${topics.up('X', kind).replace('/dev/X/', '/dev/{id}/')}\``);
    for (const kind of DOWN_KINDS) expect(protoReadme).toContain(`\`${topics.down('X', kind).replace('/dev/X/', '/dev/{id}/')}\``);
    expect(protoReadme).toContain(`\`${topics.opsRequest('X').replace('/ops/X/', '/ops/{op}/')}\``);
    expect(protoReadme).toContain(`\`${topics.opsReply('X').replace('/ops/X/', '/ops/{op}/')}\``);
  });

  it('lists every operator method with its least role', () => {
    for (const [name, m] of Object.entries(METHODS)) expect(protoReadme).toMatch(new RegExp(`\\| \`${name.replace('.', '\\.')}\` \\| ${m.role} \\|`));
  });
});

describe('README.md', () => {
  it('documents every setting of both daemons exactly as the schemas define them', () => {
    expect(between(readme, 'config:server')).toBe(describeConfig(ServerConfig, 'EDGEFLEET_SERVER'));
    expect(between(readme, 'config:agent')).toBe(describeConfig(AgentConfig, 'EDGEFLEET_AGENT'));
  });

  it('documents every exit code', () => {
    for (const code of Object.values(EXIT)) expect(readme).toMatch(new RegExp(`(^|\\| |/ )${code}( |$)`, 'm'));
  });

  it('shows the install-and-start and the test commands on its first screen', () => {
    const firstScreen = readme.split('\n').slice(0, 40).join('\n');
    expect(firstScreen).toContain('npm ci && npm start');
    expect(firstScreen).toContain('npm test');
  });
});
