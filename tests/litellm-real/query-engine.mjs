#!/usr/bin/env node
//! Test-only stand-in for Prisma's native `query-engine` binary, for LiteLLM's prisma-client-py.
//
// Why: prisma-client-py (LiteLLM pins 0.11.0) starts the native engine, which only
// binaries.prisma.sh publishes; a machine that reaches only package registries cannot get it.
// npm publishes the same engine core (commit 393aa359, Prisma 5.17) compiled to WebAssembly,
// with Prisma's own node-postgres driver adapter. This program serves the native engine's HTTP
// API (what prisma-client-py speaks: GraphQL protocol) on top of that core (JSON protocol only).
// What is ours is only the protocol mapping; query planning and SQL are Prisma's.
//
//   query-engine.mjs --version          -> "query-engine <commit>" (the Prisma CLI asks)
//   query-engine.mjs -p PORT ...        -> serve on localhost:PORT (127.0.0.1 and ::1)
// Environment: PRISMA_DML_PATH (the schema), OVERWRITE_DATASOURCES / DATABASE_URL (the
// database), BOTCREDS_QE_DEBUG=1 (log every mapped query to stderr).

import fs from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const ENGINE_COMMIT = '393aa359c9ad4a4bb28630fb5613f9c281cde053';
const args = process.argv.slice(2);
if (args.some((a) => a === '--version' || a === '-V' || a === 'version')) {
  process.stdout.write(`query-engine ${ENGINE_COMMIT}\n`);
  process.exit(0);
}
const debug = process.env.BOTCREDS_QE_DEBUG ? (...m) => console.error('[query-engine]', ...m) : () => {};
const portArg = args.findIndex((a) => a === '-p' || a === '--port');
const port = portArg >= 0 ? Number(args[portArg + 1]) : 0;

// The npm packages sit next to this file (the launcher installs them there).
const here = path.dirname(fileURLToPath(import.meta.url));
const requireHere = createRequire(path.join(here, 'package.json'));

// ---------------------------------------------------------------------------------- schema
// Field types per model, read from the datamodel: Json inputs need wrapping, relation fields
// lead into nested writes and filters.
const datamodel = fs.readFileSync(process.env.PRISMA_DML_PATH, 'utf8');

function readModels(text) {
  const models = new Map();
  let fields = null;
  for (const raw of text.split('\n')) {
    const line = raw.replace(/\/\/.*$/, '').trim();
    const open = /^model\s+(\w+)\s*\{/.exec(line);
    if (open) { fields = new Map(); models.set(open[1], fields); continue; }
    if (line.startsWith('}')) { fields = null; continue; }
    if (!fields || !line || line.startsWith('@@')) continue;
    const f = /^(\w+)\s+(\w+)/.exec(line);
    if (f) fields.set(f[1], f[2]);
  }
  return models;
}
const models = readModels(datamodel);

function databaseUrl() {
  const over = process.env.OVERWRITE_DATASOURCES;
  if (over) {
    const list = JSON.parse(over);
    if (Array.isArray(list) && list.length && list[0].url) return list[0].url;
  }
  const m = /url\s*=\s*env\("([^"]+)"\)/.exec(datamodel);
  return process.env[m ? m[1] : 'DATABASE_URL'];
}

// ---------------------------------------------------------------------------------- engine
async function startEngine() {
  const url = new URL(databaseUrl());
  const schema = url.searchParams.get('schema') || undefined;
  // Prisma's own URL parameters mean nothing to libpq.
  for (const k of [...url.searchParams.keys()]) {
    if (['schema', 'connection_limit', 'pool_timeout', 'connect_timeout', 'socket_timeout',
      'pgbouncer', 'statement_cache_size'].includes(k)) url.searchParams.delete(k);
  }
  const pg = requireHere('pg');
  const { PrismaPg } = requireHere('@prisma/adapter-pg');
  const { bindAdapter } = requireHere('@prisma/driver-adapter-utils');

  const pool = new pg.Pool({ connectionString: url.toString(), max: 10 });
  // The 5.17 adapter refuses Postgres catalog types LiteLLM's raw queries select (`name`,
  // `regclass`, "char", ...); the native engine reads them as text, so say they are text.
  const asText = new Set([18, 19, 24, 705, 2202, 2203, 2204, 2205, 2206, 3734, 3769, 4089, 4096]);
  const asTextArray = new Set([1002, 1003, 1008, 2210, 2211]);
  const parseTextArray = pg.types.getTypeParser(1009);
  const retype = (result) => {
    for (const [i, field] of (result?.fields ?? []).entries()) {
      if (asText.has(field.dataTypeID)) field.dataTypeID = 25;
      if (asTextArray.has(field.dataTypeID)) {
        field.dataTypeID = 1009;
        for (const row of result.rows ?? []) {
          const key = Array.isArray(row) ? i : field.name;
          if (typeof row[key] === 'string') row[key] = parseTextArray(row[key]);
        }
      }
    }
    return result;
  };
  const patch = (target) => {
    const query = target.query;
    target.query = function (...a) {
      const r = query.apply(this, a);
      return r && typeof r.then === 'function' ? r.then(retype) : r;
    };
  };
  patch(pool);
  pool.on('connect', patch);

  const pkg = path.dirname(requireHere.resolve('@prisma/query-engine-wasm/package.json'));
  const glue = await import(pathToFileURL(path.join(pkg, 'postgresql', 'query_engine_bg.js')).href);
  const bytes = fs.readFileSync(path.join(pkg, 'postgresql', 'query_engine_bg.wasm'));
  const { instance } = await WebAssembly.instantiate(bytes, { './query_engine_bg.js': glue });
  glue.__wbg_set_wasm(instance.exports);

  const adapter = bindAdapter(new PrismaPg(pool, schema ? { schema } : undefined));
  const engine = new glue.QueryEngine(
    { datamodel, logLevel: 'error', logQueries: false },
    (line) => debug('engine', line),
    adapter,
  );
  await engine.connect('{}');
  return { engine, pool };
}

// ------------------------------------------------------------- GraphQL -> JSON protocol
const { parse, Kind } = requireHere('graphql');
const RAW_ACTIONS = new Set(['queryRaw', 'executeRaw']);
// Longest first, so `createMany` is not read as `createOne`'s prefix and the like.
const MODEL_ACTIONS = ['findUnique', 'findFirst', 'findMany', 'createOne', 'createMany',
  'updateOne', 'updateMany', 'deleteOne', 'deleteMany', 'upsertOne', 'aggregate', 'groupBy']
  .sort((a, b) => b.length - a.length);
const NULL_ENUMS = new Set(['DbNull', 'JsonNull', 'AnyNull']);

function splitOperation(name) {
  if (RAW_ACTIONS.has(name)) return { action: name };
  const orThrow = name.endsWith('OrThrow');
  const bare = orThrow ? name.slice(0, -'OrThrow'.length) : name;
  const action = MODEL_ACTIONS.find((a) => bare.startsWith(a) && models.has(bare.slice(a.length)));
  if (!action) throw new Error(`no Prisma operation is called ${name}`);
  return { action: orThrow ? `${action}OrThrow` : action, model: bare.slice(action.length) };
}

function literal(node) {
  switch (node.kind) {
    case Kind.NULL: return null;
    case Kind.BOOLEAN: case Kind.STRING: return node.value;
    case Kind.FLOAT: return Number(node.value);
    case Kind.INT: {
      const n = Number(node.value);
      return Number.isSafeInteger(n) ? n : { $type: 'BigInt', value: node.value };
    }
    case Kind.ENUM: return NULL_ENUMS.has(node.value) ? { $type: 'Enum', value: node.value } : node.value;
    case Kind.LIST: return node.values.map(literal);
    case Kind.OBJECT: return Object.fromEntries(node.fields.map((f) => [f.name.value, literal(f.value)]));
    default: throw new Error(`GraphQL value of kind ${node.kind} is not supported`);
  }
}

function argumentsOf(field) {
  return Object.fromEntries((field.arguments ?? []).map((a) => [a.name.value, literal(a.value)]));
}

function selectionOf(set) {
  const out = {};
  for (const node of set.selections) {
    if (node.kind !== Kind.FIELD) throw new Error('GraphQL fragments are not supported');
    const nested = node.selectionSet || node.arguments?.length;
    if (!nested) { out[node.name.value] = true; continue; }
    const entry = {};
    if (node.arguments?.length) entry.arguments = argumentsOf(node);
    if (node.selectionSet) entry.selection = selectionOf(node.selectionSet);
    out[node.name.value] = entry;
  }
  return out;
}

// prisma-client-py sends a Json field's value as JSON text; in the JSON protocol a bare
// string is a JSON string, so Json inputs become {"$type": "Json", "value": text}.
const asJson = (v) => (typeof v === 'string' ? { $type: 'Json', value: v } : v);
const each = (v, f) => (Array.isArray(v) ? v.map(f) : f(v));
const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

function mapData(model, data) {
  const fields = models.get(model);
  if (!fields || !isObject(data)) return data;
  const out = {};
  for (const [k, v] of Object.entries(data)) {
    const type = fields.get(k);
    if (type === 'Json') out[k] = asJson(v);
    else if (models.has(type) && isObject(v)) out[k] = mapNestedWrite(type, v);
    else out[k] = v;
  }
  return out;
}

function mapNestedWrite(model, ops) {
  const out = {};
  for (const [op, v] of Object.entries(ops)) {
    if (op === 'create') out[op] = each(v, (d) => mapData(model, d));
    else if (op === 'createMany') out[op] = { ...v, data: each(v.data, (d) => mapData(model, d)) };
    else if (op === 'connectOrCreate') {
      out[op] = each(v, (x) => ({ ...x, where: mapWhere(model, x.where), create: mapData(model, x.create) }));
    } else if (op === 'upsert') {
      out[op] = each(v, (x) => ({ ...x, where: mapWhere(model, x.where),
        create: mapData(model, x.create), update: mapData(model, x.update) }));
    } else if (op === 'update' || op === 'updateMany') {
      out[op] = each(v, (x) => (isObject(x) && 'data' in x
        ? { ...x, where: mapWhere(model, x.where), data: mapData(model, x.data) }
        : mapData(model, x)));
    } else out[op] = v;
  }
  return out;
}

function mapWhere(model, where) {
  const fields = models.get(model);
  if (!fields || !isObject(where)) return where;
  const out = {};
  for (const [k, v] of Object.entries(where)) {
    const type = fields.get(k);
    if (k === 'AND' || k === 'OR' || k === 'NOT') out[k] = each(v, (w) => mapWhere(model, w));
    else if (type === 'Json' && isObject(v) && !('$type' in v)) {
      out[k] = Object.fromEntries(Object.entries(v).map(([op, x]) =>
        [op, op === 'equals' || op === 'not' ? asJson(x) : x]));
    } else if (models.has(type) && isObject(v)) {
      out[k] = Object.fromEntries(Object.entries(v).map(([op, x]) =>
        [op, ['is', 'isNot', 'some', 'every', 'none'].includes(op) ? mapWhere(type, x) : x]));
    } else out[k] = v;
  }
  return out;
}

function mapArguments(model, a) {
  if (!model) return a;
  const out = { ...a };
  if ('where' in out) out.where = mapWhere(model, out.where);
  if ('data' in out) out.data = each(out.data, (d) => mapData(model, d));
  if ('create' in out) out.create = mapData(model, out.create);
  if ('update' in out) out.update = mapData(model, out.update);
  return out;
}

/** One GraphQL document -> [{request (JSON protocol), alias, raw}], one per top-level field. */
function toJsonProtocol(document) {
  const op = parse(document).definitions.find((d) => d.kind === Kind.OPERATION_DEFINITION);
  return op.selectionSet.selections.map((field) => {
    const name = field.name.value;
    const { action, model } = splitOperation(name);
    const raw = RAW_ACTIONS.has(action);
    const request = {
      action,
      query: {
        arguments: mapArguments(model, argumentsOf(field)),
        selection: raw || !field.selectionSet ? { $scalars: true } : selectionOf(field.selectionSet),
      },
    };
    if (model) request.modelName = model;
    return { request, alias: field.alias ? field.alias.value : name, action };
  });
}

// ------------------------------------------------------------- JSON protocol -> GraphQL
// JSON-protocol output values are tagged ({"$type": "DateTime", "value": ...}); the GraphQL
// protocol sends them bare (Json as its JSON text).
function untag(v) {
  if (Array.isArray(v)) return v.map(untag);
  if (!isObject(v)) return v;
  const keys = Object.keys(v);
  if (keys.length === 2 && '$type' in v && 'value' in v) {
    if (v.$type === 'BigInt') {
      const n = Number(v.value);
      return Number.isSafeInteger(n) ? n : v.value;
    }
    return v.value;
  }
  return Object.fromEntries(keys.map((k) => [k, untag(v[k])]));
}

// Raw query rows: this engine answers {columns, types, rows}; the 5.4 engine prisma-client-py
// 0.11 was written for answers [{column: {prisma__type, prisma__value}}].
function typedCell(type, value) {
  if (value === null || value === undefined) return { prisma__type: 'null', prisma__value: null };
  if (type.endsWith('-array')) {
    const inner = type.slice(0, -'-array'.length);
    return { prisma__type: 'array', prisma__value: value.map((x) => typedCell(inner, x)) };
  }
  return { prisma__type: type, prisma__value: value };
}
function legacyRows(r) {
  if (!isObject(r) || !Array.isArray(r.columns)) return r;
  return r.rows.map((row) => Object.fromEntries(r.columns.map((c, i) => [c, typedCell(r.types[i], row[i])])));
}

function toGraphqlAnswer(answer, t) {
  if (!isObject(answer) || !isObject(answer.data)) return answer;
  let value = Object.values(answer.data)[0];
  if (t.action === 'queryRaw') value = legacyRows(value);
  else if (t.action !== 'executeRaw') value = untag(value);
  return { data: { [t.alias]: value } };
}

// ------------------------------------------------------------------------------ server
async function main() {
  const { engine, pool } = await startEngine();

  async function run(body, txId) {
    if (Array.isArray(body.batch)) {
      const parts = body.batch.map((b) => toJsonProtocol(b.query)[0]);
      const request = { batch: parts.map((p) => p.request) };
      if (body.transaction) request.transaction = isObject(body.transaction) ? body.transaction : {};
      const answer = JSON.parse(await engine.query(JSON.stringify(request), '{}', txId));
      if (Array.isArray(answer.batchResult)) {
        answer.batchResult = answer.batchResult.map((r, i) => toGraphqlAnswer(r, parts[i]));
      }
      return answer;
    }
    const parts = toJsonProtocol(body.query);
    if (parts.length !== 1) throw new Error('one operation per request is supported');
    debug('query', JSON.stringify(parts[0].request));
    const answer = JSON.parse(await engine.query(JSON.stringify(parts[0].request), '{}', txId));
    return toGraphqlAnswer(answer, parts[0]);
  }

  async function route(req, text) {
    const url = new URL(req.url, 'http://localhost');
    if (req.method === 'GET' && url.pathname === '/status') return [200, { status: 'ok' }];
    if (req.method === 'GET' && url.pathname === '/metrics') {
      return url.searchParams.get('format') === 'prometheus' ? [200, ''] : [200, { counters: [], gauges: [], histograms: [] }];
    }
    if (req.method === 'POST' && url.pathname === '/') {
      return [200, await run(JSON.parse(text), req.headers['x-transaction-id'] || undefined)];
    }
    if (req.method === 'POST' && url.pathname === '/transaction/start') {
      const r = JSON.parse(await engine.startTransaction(text || '{}', '{}'));
      return [r.errors ? 400 : 200, r];
    }
    const tx = /^\/transaction\/([^/]+)\/(commit|rollback)$/.exec(url.pathname);
    if (req.method === 'POST' && tx) {
      const out = tx[2] === 'commit' ? await engine.commitTransaction(tx[1], '{}') : await engine.rollbackTransaction(tx[1], '{}');
      const r = out ? JSON.parse(out) : {};
      return [r.errors ? 400 : 200, r];
    }
    return [404, { errors: [{ error: `no route ${req.method} ${url.pathname}` }] }];
  }

  const handler = (req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', async () => {
      let status; let body;
      try {
        [status, body] = await route(req, Buffer.concat(chunks).toString('utf8'));
      } catch (e) {
        const message = String(e?.message ?? e);
        console.error('[query-engine] request failed:', e?.stack ?? e);
        [status, body] = [200, { errors: [{ error: message, user_facing_error: { is_panic: false, message } }] }];
      }
      const text = typeof body === 'string' ? body : JSON.stringify(body);
      res.writeHead(status, { 'content-type': typeof body === 'string' ? 'text/plain' : 'application/json' });
      res.end(text);
    });
  };

  // prisma-client-py dials http://localhost:PORT, which may be either address family.
  const servers = [];
  for (const host of ['127.0.0.1', '::1']) {
    const server = http.createServer(handler);
    const ok = await new Promise((resolve) => {
      server.once('error', () => resolve(false));
      server.listen(port, host, () => resolve(true));
    });
    if (ok) servers.push(server);
  }
  if (!servers.length) throw new Error(`cannot listen on port ${port}`);

  const stop = async () => {
    for (const s of servers) s.close();
    await engine.disconnect('{}').catch(() => {});
    await pool.end().catch(() => {});
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((e) => {
  console.error('[query-engine] could not start:', e?.stack ?? e);
  process.exit(1);
});
