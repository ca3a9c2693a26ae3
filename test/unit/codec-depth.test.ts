/** The two depth checks agree: on a value, and on its JSON text (strings with brackets and escapes included). */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { jsonNestsDeeperThan, nestsDeeperThan } from '../../proto/index.js';

describe('nesting depth', () => {
  it('measures JSON text exactly as it measures the value', () => {
    const deepish = fc.letrec((tie) => ({
      node: fc.oneof({ depthSize: 'small' }, fc.jsonValue({ maxDepth: 3 }), fc.array(tie('node'), { maxLength: 3 }), fc.dictionary(fc.string(), tie('node'), { maxKeys: 3 })),
    })).node;
    fc.assert(
      fc.property(deepish, fc.integer({ min: 0, max: 12 }), (value, max) => {
        expect(jsonNestsDeeperThan(JSON.stringify(value), max)).toBe(nestsDeeperThan(value, max));
      }),
      { numRuns: 500 },
    );
  });

  it('is not fooled by brackets inside strings', () => {
    expect(jsonNestsDeeperThan(JSON.stringify({ s: '[[[[[[{{{{{\\"]]]' }), 2)).toBe(false);
    expect(jsonNestsDeeperThan(JSON.stringify([[[['x']]]]), 3)).toBe(true);
  });
});
