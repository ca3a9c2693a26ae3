#!/usr/bin/env node
/**
 * `npm run traffic:iris`: live traffic for a device serving the iris model, through its KServe v2
 * API. Rows of the real Iris data in a scrambled order, so any stretch of requests looks like the
 * baseline (a probation judges the output distribution against it). Prints which versions
 * answered, so a rollback shows up as a change of version.
 */
import { parseArgs } from 'node:util';
import { EXIT } from '../proto/index.js';
import { irisSamples } from './train-iris.js';

const USAGE = `npm run traffic:iris -- [--url http://127.0.0.1:8700] [--model iris] [--requests 500] [--rate 50] [--label]

  --label  after each answer, send the row's true class as feedback (POST /v2/models/<model>/feedback):
           the device keeps the labelled requests as samples for federated rounds`;

async function main(): Promise<number> {
  let values;
  try {
    values = parseArgs({
      options: { url: { type: 'string', default: 'http://127.0.0.1:8700' }, model: { type: 'string', default: 'iris' }, requests: { type: 'string', default: '500' }, rate: { type: 'string', default: '50' }, label: { type: 'boolean', default: false } },
      strict: true,
    }).values;
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n${USAGE}\n`);
    return EXIT.USAGE;
  }
  const requests = Number(values.requests);
  const rate = Number(values.rate);
  const { features, labels } = irisSamples();
  let labelled = 0;
  const versions = new Map<string, number>();
  const errors = new Map<string, number>();
  let last = '';
  for (let i = 0; i < requests; i++) {
    const row = features[(i * 7919) % features.length] as number[];
    try {
      const res = await fetch(`${values.url}/v2/models/${values.model}/infer`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ inputs: [{ name: 'features', shape: [1, 4], datatype: 'FP32', data: row }] }),
      });
      const body = (await res.json()) as { model_version?: string; code?: string; id?: string };
      if (res.ok && values.label && body.id) {
        const fb = await fetch(`${values.url}/v2/models/${values.model}/feedback`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ id: body.id, label: labels[(i * 7919) % features.length] }),
        });
        if (fb.ok) labelled++;
        await fb.arrayBuffer();
      }
      const key = res.ok ? `v${body.model_version}` : `${res.status} ${body.code ?? ''}`;
      (res.ok ? versions : errors).set(key, ((res.ok ? versions : errors).get(key) ?? 0) + 1);
      if (key !== last) process.stdout.write(`request ${i + 1}: ${res.ok ? `answered by ${values.model} version ${body.model_version}` : key}\n`);
      last = key;
    } catch (e) {
      errors.set('unreachable', (errors.get('unreachable') ?? 0) + 1);
      if (last !== 'unreachable') process.stdout.write(`request ${i + 1}: ${(e as Error).message}\n`);
      last = 'unreachable';
    }
    if (rate > 0) await new Promise((r) => setTimeout(r, 1000 / rate));
  }
  process.stdout.write(`${JSON.stringify({ requests, versions: Object.fromEntries(versions), errors: Object.fromEntries(errors), ...(values.label ? { labelled } : {}) })}\n`);
  return EXIT.OK;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
    process.exit(1);
  },
);
