import { readFileSync } from 'node:fs';
import { z } from 'zod';
import { summarizeIssues } from '../proto/codec.js';

export type ConfigResult<T> = { ok: true; config: Readonly<T> } | { ok: false; errors: string[] };

interface Leaf {
  path: string[];
  env: string;
  schema: z.ZodType;
}

/** `broker.publicUrl` under prefix EDGEFLEET_SERVER → `EDGEFLEET_SERVER_BROKER_PUBLIC_URL`. */
export function envName(prefix: string, path: readonly string[]): string {
  return [prefix, ...path.map((p) => p.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toUpperCase())].join('_');
}

function unwrap(schema: z.ZodType): z.ZodType {
  let s = schema;
  for (;;) {
    if (s instanceof z.ZodDefault || s instanceof z.ZodPrefault || s instanceof z.ZodOptional || s instanceof z.ZodNullable) {
      s = s.unwrap() as z.ZodType;
    } else return s;
  }
}

/** Every leaf setting of an object schema, with the environment variable that overrides it. */
export function configLeaves(schema: z.ZodType, prefix: string, path: string[] = []): Leaf[] {
  const inner = unwrap(schema);
  if (inner instanceof z.ZodObject) {
    return Object.entries(inner.shape as Record<string, z.ZodType>).flatMap(([k, v]) => configLeaves(v, prefix, [...path, k]));
  }
  return [{ path, env: envName(prefix, path), schema }];
}

function coerce(raw: string, schema: z.ZodType): unknown {
  const inner = unwrap(schema);
  if (inner instanceof z.ZodNumber) return raw.trim() === '' ? raw : Number(raw);
  if (inner instanceof z.ZodBoolean) return raw === 'true' || raw === '1' ? true : raw === 'false' || raw === '0' ? false : raw;
  if (inner instanceof z.ZodArray || inner instanceof z.ZodRecord) {
    try {
      return JSON.parse(raw) as unknown;
    } catch {
      return raw;
    }
  }
  // Numeric literals and unions of them (`protocolVersion: 4 | 5`, `configVersion: 1`): the number
  // when the string itself does not fit but its number does.
  if ((inner instanceof z.ZodLiteral || inner instanceof z.ZodUnion) && raw.trim() !== '' && !inner.safeParse(raw).success && inner.safeParse(Number(raw)).success) {
    return Number(raw);
  }
  return raw;
}

function setPath(obj: Record<string, unknown>, path: readonly string[], value: unknown): void {
  let cur = obj;
  for (const key of path.slice(0, -1)) {
    const next = cur[key];
    if (next === undefined || next === null || typeof next !== 'object' || Array.isArray(next)) cur[key] = {};
    cur = cur[key] as Record<string, unknown>;
  }
  cur[path[path.length - 1] as string] = value;
}

function deepFreeze<T>(v: T): T {
  if (v && typeof v === 'object') {
    for (const child of Object.values(v)) deepFreeze(child);
    Object.freeze(v);
  }
  return v;
}

/**
 * Loads one daemon's configuration: the JSON file (if any), then environment overrides named after
 * schema paths, validated by one schema. Every problem is reported at once; the result is frozen.
 */
export function loadConfig<S extends z.ZodType>(opts: {
  schema: S;
  file?: string | undefined;
  env?: NodeJS.ProcessEnv;
  envPrefix: string;
  overrides?: Record<string, unknown>;
}): ConfigResult<z.output<S>> {
  const errors: string[] = [];
  let raw: Record<string, unknown> = {};
  if (opts.file !== undefined) {
    try {
      const parsed: unknown = JSON.parse(readFileSync(opts.file, 'utf8'));
      if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) errors.push(`${opts.file}: the file must hold a JSON object`);
      else raw = parsed as Record<string, unknown>;
    } catch (e) {
      errors.push(`${opts.file}: ${(e as Error).message}`);
    }
  }
  const env = opts.env ?? process.env;
  for (const leaf of configLeaves(opts.schema, opts.envPrefix)) {
    const v = env[leaf.env];
    if (v !== undefined) setPath(raw, leaf.path, coerce(v, leaf.schema));
  }
  for (const [path, value] of Object.entries(opts.overrides ?? {})) {
    if (value !== undefined) setPath(raw, path.split('.'), value);
  }
  const result = opts.schema.safeParse(raw);
  if (!result.success) {
    // One line per issue (a message may itself hold "; ", so no joining and splitting).
    errors.push(...result.error.issues.map((i) => summarizeIssues([i])));
  }
  if (errors.length > 0 || !result.success) return { ok: false, errors };
  return { ok: true, config: deepFreeze(result.data) };
}

/** A Markdown table of every setting, its environment variable, default and description. */
export function describeConfig(schema: z.ZodType, prefix: string): string {
  const rows = configLeaves(schema, prefix).map((l) => {
    const def = l.schema instanceof z.ZodDefault ? JSON.stringify(l.schema.def.defaultValue) : '';
    return `| \`${l.path.join('.')}\` | \`${l.env}\` | ${def ? `\`${def}\`` : ''} | ${l.schema.description ?? unwrap(l.schema).description ?? ''} |`;
  });
  return ['| setting | environment | default | meaning |', '|---|---|---|---|', ...rows].join('\n');
}
