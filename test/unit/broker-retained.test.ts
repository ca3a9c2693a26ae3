import { createRequire } from 'node:module';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { literalPrefix, topicMatches } from '../../fleet-server/broker/retained.js';

/** The matcher aedes-persistence-level itself uses, as the reference. */
const req = createRequire(createRequire(import.meta.url).resolve('aedes-persistence-level'));
const { QlobberTrue } = req('qlobber') as { QlobberTrue: new (o: object) => { add(t: string): void; test(t: string): boolean } };
const QLOBBER = { wildcard_one: '+', wildcard_some: '#', separator: '/', match_empty_levels: true };

function reference(filter: string, topic: string): boolean {
  const q = new QlobberTrue(QLOBBER);
  q.add(filter);
  return q.test(topic);
}

const level = fc.constantFrom('a', 'b', 'dev', 'up', 'down', '');
const topic = fc.array(level, { minLength: 1, maxLength: 5 }).map((l) => l.join('/'));
const filter = fc
  .tuple(fc.array(fc.oneof(level, fc.constant('+')), { minLength: 1, maxLength: 5 }), fc.boolean())
  .map(([l, hash]) => (hash ? [...l, '#'] : l).join('/'));

describe('embedded broker: retained reads by range', () => {
  it('matches topics exactly as the library’s matcher does', () => {
    fc.assert(
      fc.property(filter, topic, (f, t) => {
        expect(topicMatches(f, t)).toBe(reference(f, t));
      }),
      { numRuns: 2000 },
    );
  });

  it('never misses a match: every topic a filter matches starts with the filter’s literal prefix', () => {
    fc.assert(
      fc.property(filter, topic, (f, t) => {
        if (topicMatches(f, t)) expect(t.startsWith(literalPrefix(f))).toBe(true);
      }),
      { numRuns: 2000 },
    );
  });

  it('handles the protocol’s filters', () => {
    expect(topicMatches('edgefleet/v1/dev/d1/down/+', 'edgefleet/v1/dev/d1/down/desired')).toBe(true);
    expect(topicMatches('edgefleet/v1/dev/d1/down/+', 'edgefleet/v1/dev/d10/down/desired')).toBe(false);
    expect(topicMatches('edgefleet/v1/dev/+/up/+', 'edgefleet/v1/dev/x/up/status')).toBe(true);
    expect(topicMatches('#', '$SYS/x')).toBe(false);
    expect(literalPrefix('edgefleet/v1/dev/d1/down/+')).toBe('edgefleet/v1/dev/d1/down/');
    // `a/#` matches `a` itself too (MQTT-4.7.1-2): the range starts before the separator.
    expect(literalPrefix('a/b/#')).toBe('a/b');
  });
});
