#!/usr/bin/env node
// A Lepton client in Node.js that talks to a running job the way a worker does, using nothing but
// the .proto files in ../../protos (loaded at run time with @grpc/proto-loader):
//
//   1. WatchJob (event stream, kept open for the whole run) for --watch-seconds;
//   2. RegisterMember as ROLE_WORKER, then Heartbeat every JobSpec.heartbeat_interval_s;
//   3. GetLayout and Pull one parameter tensor from the parameter server that holds it, decoded
//      (little-endian, row-major). Both answer UNAVAILABLE until the job is ready (layout not
//      decided, server not loaded): retried after the trailing metadata lepton-retry-after-ms,
//      as options.proto says, so the client may start before the servers;
//   4. LeaseShard until GRANTED (WAIT: ask again after retry_after_s);
//   5. Push a gradient for EVERY tensor that server holds (a push must carry all of them), with
//      base_version = the pulled version and sample_count = 1;
//   6. Pull again and check that the tensor changed (for a fresh Adam job: by exactly one Adam step);
//   7. CompleteShard (loss_unknown: this client computes no loss), Deregister, cancel the watch,
//      print one JSON summary line on stdout.
//
// Everything it knows about the protocol is in the .proto comments: no status code is guessed.
//
// Exit status: 0 every check passed; 1 a check failed or an RPC failed; 2 bad usage; 3 timed out.
//
// int64 fields: the protos are loaded with {longs: String}, so every int64 (versions, shapes,
// offsets, incarnations, sequences) arrives as a decimal string and is sent as one. Arithmetic on
// them is done with BigInt; shapes and offsets are converted to Number after checking that they are
// safe integers (a tensor above 2^53 bytes could not be held in a Node Buffer anyway).
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const CHUNK_BYTES = 1 << 20; // 1 MiB of tensor data per stream message, as Lepton's own clients
const CALL_DEADLINE_MS = 10000;
const ITEMSIZE = { DTYPE_FLOAT32: 4, DTYPE_FLOAT64: 8 }; // the dtypes this example can decode

function usage(message) {
  if (message) process.stderr.write(`error: ${message}\n`);
  process.stderr.write(
    'usage: node client.js --coordinator HOST:PORT [--tensor NAME] [--watch-seconds S] [--timeout S]\n' +
      '  --coordinator  the job coordinator (or LEPTON_COORDINATOR)\n' +
      '  --tensor       parameter to pull and check (default: the first tensor of the first server)\n' +
      '  --watch-seconds  how long to watch events and status before registering (default 1)\n' +
      '  --timeout      give up after this many seconds in all (default 60)\n' +
      'A bearer token is sent when LEPTON_TOKEN or LEPTON_TOKEN_FILE is set (plaintext channel only).\n'
  );
  process.exit(2);
}

function parseArgs(argv) {
  const opts = {
    coordinator: process.env.LEPTON_COORDINATOR || '',
    tensor: '',
    watchSeconds: 1.0,
    timeout: 60,
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const [key, inline] = arg.includes('=') ? arg.split(/=(.*)/s, 2) : [arg, undefined];
    const value = () => {
      if (inline !== undefined) return inline;
      if (i + 1 >= argv.length) usage(`${key} needs a value`);
      return argv[++i];
    };
    switch (key) {
      case '--coordinator': opts.coordinator = value(); break;
      case '--tensor': opts.tensor = value(); break;
      case '--watch-seconds': opts.watchSeconds = Number(value()); break;
      case '--timeout': opts.timeout = Number(value()); break;
      case '-h': case '--help': usage(); break;
      default:
        if (!arg.startsWith('-') && !opts.coordinator) opts.coordinator = arg;
        else usage(`unknown argument ${arg}`);
    }
  }
  if (!opts.coordinator) usage('--coordinator is required');
  if (!(opts.watchSeconds >= 0)) usage('--watch-seconds must be >= 0');
  if (!(opts.timeout > 0)) usage('--timeout must be > 0');
  return opts;
}

function loadProtos() {
  const definition = protoLoader.loadSync(
    ['lepton/v1/coordinator.proto', 'lepton/v1/parameter_server.proto'],
    {
      includeDirs: [PROTO_ROOT],
      keepCase: true, // field names exactly as in the .proto (snake_case)
      longs: String, // int64 as decimal strings: no silent precision loss
      enums: String, // enum values by name, e.g. 'ROLE_WORKER'
      defaults: true, // absent fields read as their proto3 defaults
      oneofs: true,
    }
  );
  return grpc.loadPackageDefinition(definition).lepton.v1;
}

function tokenMetadata() {
  const metadata = new grpc.Metadata();
  let token = process.env.LEPTON_TOKEN || '';
  if (!token && process.env.LEPTON_TOKEN_FILE) {
    token = fs.readFileSync(process.env.LEPTON_TOKEN_FILE, 'utf8').trim();
  }
  if (token) metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

const deadline = (ms = CALL_DEADLINE_MS) => new Date(Date.now() + ms);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const RETRY_AFTER_KEY = 'lepton-retry-after-ms'; // options.proto: the trailing metadata of UNAVAILABLE
const FALLBACK_BACKOFF_MS = [100, 200, 400, 800, 1600, 2000]; // without a delay: back off

// Calls attempt() until it does not fail with UNAVAILABLE (options.proto: "nothing changed; retry
// later"), waiting the lepton-retry-after-ms the server sent, else an exponential backoff. Counts
// the retries by method in summary.unavailable_retries and the delays seen in summary.retry_after_ms.
async function retryingUnavailable(method, attempt, summary, untilMs) {
  for (let n = 0; ; n++) {
    try {
      return await attempt();
    } catch (err) {
      if (err.code !== grpc.status.UNAVAILABLE || Date.now() > untilMs) throw err;
      const named = err.metadata ? err.metadata.get(RETRY_AFTER_KEY) : [];
      const delay = named.length ? Number(named[0]) : FALLBACK_BACKOFF_MS[Math.min(n, FALLBACK_BACKOFF_MS.length - 1)];
      summary.unavailable_retries[method] = (summary.unavailable_retries[method] || 0) + 1;
      if (named.length) summary.retry_after_ms[method] = Number(named[0]);
      await sleep(delay);
    }
  }
}

function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: deadline() }, (err, response) =>
      err ? reject(withContext(err, method)) : resolve(response)
    );
  });
}

function withContext(err, method) {
  const codeName = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || err.code;
  err.message = `${method} failed: ${codeName}: ${err.details || err.message}`;
  return err;
}

function toSafeNumber(value, what) {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${what} ${value} is not a safe non-negative integer`);
  return n;
}

function numel(shape) {
  return shape.reduce((acc, d) => acc * toSafeNumber(d, 'dimension'), 1);
}

// --- tensor codec (see protos/lepton/v1/common.proto) ------------------------------------------

// Reassembles TensorChunks into {name: {dtype, shape, bytes}}, enforcing the chunk rules.
class Assembler {
  constructor() {
    this.parts = new Map();
    this.current = null;
  }

  add(chunk) {
    const { name, dtype } = chunk;
    const shape = chunk.shape.map((d) => toSafeNumber(d, 'dimension'));
    const offset = toSafeNumber(chunk.offset_bytes, 'offset_bytes');
    const itemsize = ITEMSIZE[dtype];
    if (!itemsize) throw new Error(`tensor ${name}: dtype ${dtype} is not decoded by this example`);
    let part = this.parts.get(name);
    if (!part) {
      if (this.current !== null && !this.complete(this.parts.get(this.current))) {
        throw new Error(`tensor ${name} started before ${this.current} was complete`);
      }
      part = { dtype, shape, bytes: Buffer.alloc(numel(shape) * itemsize), received: 0 };
      this.parts.set(name, part);
      this.current = name;
    } else if (part.dtype !== dtype || part.shape.join(',') !== shape.join(',')) {
      throw new Error(`tensor ${name}: dtype or shape changed between chunks`);
    }
    if (offset !== part.received) throw new Error(`tensor ${name}: chunk at ${offset}, expected ${part.received}`);
    if (part.received + chunk.data.length > part.bytes.length) throw new Error(`tensor ${name}: too many bytes`);
    chunk.data.copy(part.bytes, part.received);
    part.received += chunk.data.length;
  }

  complete(part) {
    return part.received === part.bytes.length;
  }

  finish() {
    for (const [name, part] of this.parts) {
      if (!this.complete(part)) throw new Error(`tensor ${name}: ${part.received} of ${part.bytes.length} bytes`);
    }
    return this.parts;
  }
}

// Little-endian row-major bytes -> a flat Float64Array of the values (float32 widened exactly).
function decode(dtype, bytes) {
  const itemsize = ITEMSIZE[dtype];
  const out = new Float64Array(bytes.length / itemsize);
  for (let i = 0; i < out.length; i++) {
    out[i] = dtype === 'DTYPE_FLOAT32' ? bytes.readFloatLE(i * 4) : bytes.readDoubleLE(i * 8);
  }
  return out;
}

function encode(dtype, values) {
  const itemsize = ITEMSIZE[dtype];
  if (!itemsize) throw new Error(`cannot encode dtype ${dtype}`);
  const bytes = Buffer.alloc(values.length * itemsize);
  for (let i = 0; i < values.length; i++) {
    if (dtype === 'DTYPE_FLOAT32') bytes.writeFloatLE(values[i], i * 4);
    else bytes.writeDoubleLE(values[i], i * 8);
  }
  return bytes;
}

// The synthetic gradient: +0.5 at even flat indices, -0.25 at odd ones. Adam's first step moves
// every element by -lr * sign(g) (up to eps), whatever the magnitude, which the check relies on.
const gradientValue = (i) => (i % 2 === 0 ? 0.5 : -0.25);

// The PushRequest messages for one push: the header in the first message, then the chunks of every
// tensor in order, at most CHUNK_BYTES of data per chunk and per message.
function pushMessages(header, tensors) {
  const messages = [{ header, chunks: [] }];
  let size = 0;
  for (const t of tensors) {
    const total = t.bytes.length;
    let offset = 0;
    do {
      const end = Math.min(total, offset + CHUNK_BYTES);
      const n = end - offset;
      let last = messages[messages.length - 1];
      if (last.chunks.length > 0 && size + n > CHUNK_BYTES) {
        last = { chunks: [] };
        messages.push(last);
        size = 0;
      }
      last.chunks.push({
        name: t.name,
        dtype: t.dtype,
        shape: t.shape.map(String),
        offset_bytes: String(offset),
        data: t.bytes.subarray(offset, end),
      });
      size += n;
      offset = end;
    } while (offset < total);
  }
  return messages;
}

// --- RPCs that stream -------------------------------------------------------------------------

function pull(ps, member, names, metadata) {
  return new Promise((resolve, reject) => {
    const call = ps.Pull({ member, names }, metadata, { deadline: deadline() });
    const assembler = new Assembler();
    let version = null;
    let failed = false;
    call.on('data', (msg) => {
      try {
        if (version === null) version = msg.version;
        else if (msg.version !== version) throw new Error(`version changed mid-stream: ${version} -> ${msg.version}`);
        for (const chunk of msg.chunks) assembler.add(chunk);
      } catch (err) {
        failed = true;
        call.cancel();
        reject(err);
      }
    });
    call.on('error', (err) => {
      if (!failed) reject(withContext(err, 'Pull'));
    });
    call.on('end', () => {
      if (failed) return;
      try {
        if (version === null) throw new Error('Pull returned no message');
        resolve({ version, tensors: assembler.finish() });
      } catch (err) {
        reject(err);
      }
    });
  });
}

function push(ps, messages, metadata) {
  return new Promise((resolve, reject) => {
    const call = ps.Push(metadata, { deadline: deadline() }, (err, response) =>
      err ? reject(withContext(err, 'Push')) : resolve(response)
    );
    for (const msg of messages) call.write(msg);
    call.end();
  });
}

function watch(coordinator, metadata) {
  const events = [];
  const call = coordinator.WatchJob({ after_sequence: '0' }, metadata);
  const state = { events, error: null, ended: false, call };
  call.on('data', (event) => events.push(event));
  call.on('error', (err) => {
    if (err.code !== grpc.status.CANCELLED) state.error = withContext(err, 'WatchJob').message;
  });
  call.on('end', () => {
    state.ended = true;
  });
  return state;
}

async function waitForChannel(client, what, ms) {
  await new Promise((resolve, reject) =>
    client.waitForReady(deadline(ms), (err) => (err ? reject(new Error(`${what} unreachable: ${err.message}`)) : resolve()))
  );
}

// --- the program ------------------------------------------------------------------------------

async function main(opts, summary) {
  const lepton = loadProtos();
  const metadata = tokenMetadata();
  const coordinator = new lepton.Coordinator(opts.coordinator, grpc.credentials.createInsecure());
  await waitForChannel(coordinator, `coordinator ${opts.coordinator}`, CALL_DEADLINE_MS);

  // 1. Watch events for a moment.
  const watcher = watch(coordinator, metadata);
  await sleep(opts.watchSeconds * 1000);
  summary.events_before_register = watcher.events.length;
  const giveUpAt = Date.now() + opts.timeout * 1000;
  summary.unavailable_retries = {};
  summary.retry_after_ms = {};

  // 2. Register as a worker, and heartbeat from now on (a silent member is declared dead).
  const registered = await unary(
    coordinator,
    'RegisterMember',
    {
      role: 'ROLE_WORKER',
      hostname: os.hostname(),
      pid: String(process.pid),
      instance: process.env.LEPTON_INSTANCE || process.env.POD_NAME || '',
    },
    metadata
  );
  const member = registered.member;
  const job = registered.job;
  summary.member = { member_id: member.member_id, incarnation: member.incarnation };
  summary.optimizer = job.optimizer ? job.optimizer.name : '';
  summary.learning_rate = job.optimizer ? job.optimizer.learning_rate : null;
  summary.mode = job.mode;
  summary.heartbeats = 0;
  const heartbeat = setInterval(() => {
    coordinator.Heartbeat({ member }, metadata, { deadline: deadline() }, (err) => {
      if (!err) summary.heartbeats++;
      else summary.heartbeat_error = withContext(err, 'Heartbeat').message;
    });
  }, Math.max(50, job.heartbeat_interval_s * 1000));

  try {
    // 3. The layout: UNAVAILABLE (with lepton-retry-after-ms) until the coordinator decided it.
    const layout = await retryingUnavailable(
      'GetLayout', () => unary(coordinator, 'GetLayout', {}, metadata), summary, giveUpAt
    );
    summary.layout_version = layout.layout_version;
    summary.servers = layout.servers.length;
    let server = layout.servers.find((s) => s.tensors.length > 0);
    let info = server && server.tensors[0];
    if (opts.tensor) {
      server = layout.servers.find((s) => s.tensors.some((t) => t.name === opts.tensor));
      if (!server) throw new Error(`no server holds tensor ${opts.tensor}`);
      info = server.tensors.find((t) => t.name === opts.tensor);
    }
    if (!server) throw new Error('the layout has no tensors');
    summary.server = { member_id: server.member_id, address: server.address, tensors: server.tensors.length };
    summary.tensor = { name: info.name, dtype: info.dtype, shape: info.shape.map(Number) };

    // Pull one tensor: UNAVAILABLE (with lepton-retry-after-ms) until the server loaded its share.
    const ps = new lepton.ParameterServer(server.address, grpc.credentials.createInsecure());
    await waitForChannel(ps, `parameter server ${server.address}`, CALL_DEADLINE_MS);
    const before = await retryingUnavailable(
      'Pull', () => pull(ps, member, [info.name], metadata), summary, giveUpAt
    );

    // 4. A shard to train: WAIT until the job trains (and while no shard is free).
    let lease = null;
    summary.lease_waits = 0;
    while (lease === null) {
      const answer = await unary(coordinator, 'LeaseShard', { member, max_wait_s: 1 }, metadata);
      if (answer.outcome === 'LEASE_OUTCOME_GRANTED') lease = answer.lease;
      else if (answer.outcome === 'LEASE_OUTCOME_WAIT') {
        summary.lease_waits++;
        await sleep(answer.retry_after_s * 1000);
      } else throw new Error(`LeaseShard answered ${answer.outcome}`);
    }
    summary.lease = { epoch: lease.epoch, shard: lease.shard, lease_id: lease.lease_id };
    summary.job_state = (await unary(coordinator, 'GetStatus', {}, metadata)).state;
    const pulled = before.tensors.get(info.name);
    if (!pulled) throw new Error(`Pull did not return ${info.name}`);
    if (pulled.shape.join(',') !== info.shape.map(Number).join(',') || pulled.dtype !== info.dtype) {
      throw new Error(`pulled ${info.name} as ${pulled.dtype}${JSON.stringify(pulled.shape)}, layout says ${info.dtype}${JSON.stringify(info.shape)}`);
    }
    const valuesBefore = decode(pulled.dtype, pulled.bytes);
    summary.version_before = before.version;
    summary.numel = valuesBefore.length;
    summary.values_before_head = Array.from(valuesBefore.slice(0, 4));
    summary.all_finite = valuesBefore.every(Number.isFinite);

    // 5. Push a gradient of the right dtype and shape for every tensor this server holds.
    const grads = server.tensors.map((t) => {
      const n = numel(t.shape);
      const values = new Float64Array(n);
      for (let i = 0; i < n; i++) values[i] = gradientValue(i);
      return { name: t.name, dtype: t.dtype, shape: t.shape.map(Number), bytes: encode(t.dtype, values) };
    });
    const header = {
      member,
      base_version: before.version,
      sample_count: '1',
      request_id: `node-${process.pid}-${Date.now()}`,
    };
    const messages = pushMessages(header, grads);
    const pushed = await push(ps, messages, metadata);
    summary.push = {
      outcome: pushed.outcome,
      version: pushed.version,
      staleness: pushed.staleness,
      tensors: grads.length,
      bytes: grads.reduce((acc, g) => acc + g.bytes.length, 0),
      messages: messages.length,
    };

    // 6. Pull again and compare.
    const after = await pull(ps, member, [info.name], metadata);
    const valuesAfter = decode(info.dtype, after.tensors.get(info.name).bytes);
    summary.version_after = after.version;
    summary.values_after_head = Array.from(valuesAfter.slice(0, 4));
    let changed = 0;
    let maxDelta = 0;
    for (let i = 0; i < valuesBefore.length; i++) {
      const d = Math.abs(valuesAfter[i] - valuesBefore[i]);
      if (d !== 0) changed++;
      maxDelta = Math.max(maxDelta, d);
    }
    summary.changed_elements = changed;
    summary.max_abs_delta = maxDelta;

    // A fresh Adam (no earlier update, no extra kwargs): one step moves each element by
    // -lr * g / (|g| + eps), i.e. -lr * sign(g) to within float32 rounding.
    const kwargs = job.optimizer && job.optimizer.kwargs && job.optimizer.kwargs.fields;
    const plainAdam =
      summary.optimizer.toLowerCase() === 'adam' && (!kwargs || Object.keys(kwargs).length === 0);
    summary.adam_first_step_checked = plainAdam && BigInt(before.version) === 0n;
    if (summary.adam_first_step_checked) {
      const lr = job.optimizer.learning_rate;
      let maxError = 0;
      for (let i = 0; i < valuesBefore.length; i++) {
        const g = gradientValue(i);
        const expected = valuesBefore[i] - (lr * g) / (Math.abs(g) + 1e-8);
        maxError = Math.max(maxError, Math.abs(valuesAfter[i] - expected));
      }
      summary.adam_first_step_max_error = maxError;
    }

    const failures = [];
    if (pushed.outcome !== 'PUSH_OUTCOME_APPLIED') failures.push(`push outcome ${pushed.outcome}`);
    if (BigInt(after.version) !== BigInt(before.version) + 1n) {
      failures.push(`version went from ${before.version} to ${after.version}, expected +1`);
    }
    if (changed === 0) failures.push(`${info.name} did not change`);
    if (summary.adam_first_step_checked && !(summary.adam_first_step_max_error <= 1e-5)) {
      failures.push(`not one Adam step: max error ${summary.adam_first_step_max_error}`);
    }
    if (watcher.events.length === 0) failures.push('no job event received');
    if (failures.length) throw new Error(failures.join('; '));
    ps.close();

    // 7. Complete the shard. This client computes no loss: loss_unknown, so recent_loss is untouched.
    const samples = String(BigInt(lease.end) - BigInt(lease.start) - BigInt(lease.offset));
    const completed = await unary(
      coordinator,
      'CompleteShard',
      { member, epoch: lease.epoch, shard: lease.shard, samples, lease_id: lease.lease_id, loss_unknown: true },
      metadata
    );
    const statusAfter = await unary(coordinator, 'GetStatus', {}, metadata);
    summary.completed = { samples, epoch_completed: completed.epoch_completed, shard_completions: statusAfter.shard_completions };
  } finally {
    clearInterval(heartbeat);
    // Leave cleanly and stop watching.
    try {
      await unary(coordinator, 'Deregister', { member }, metadata);
      summary.deregistered = true;
    } catch (err) {
      summary.deregister_error = err.message;
    }
    await sleep(100); // let the watch deliver our own registration / departure events
    watcher.call.cancel();
    summary.events_received = watcher.events.length;
    summary.event_kinds = [...new Set(watcher.events.map((e) => e.kind))];
    summary.last_event_sequence = watcher.events.length ? watcher.events[watcher.events.length - 1].sequence : null;
    summary.own_registration_seen = watcher.events.some(
      (e) => e.kind === 'EVENT_KIND_MEMBER_REGISTERED' && e.member && e.member.member_id === member.member_id
    );
    if (watcher.error) summary.watch_error = watcher.error;
    coordinator.close();
  }
}

if (require.main === module) {
  const opts = parseArgs(process.argv.slice(2));
  const summary = { ok: false, coordinator: opts.coordinator, longs: 'String' };
  const timer = setTimeout(() => {
    summary.error = `timed out after ${opts.timeout} s`;
    process.stdout.write(JSON.stringify(summary) + '\n');
    process.exit(3);
  }, opts.timeout * 1000);
  main(opts, summary).then(
    () => {
      clearTimeout(timer);
      summary.ok = true;
      process.stdout.write(JSON.stringify(summary) + '\n');
      process.exit(0);
    },
    (err) => {
      clearTimeout(timer);
      summary.error = err && err.message ? err.message : String(err);
      process.stdout.write(JSON.stringify(summary) + '\n');
      process.exit(1);
    }
  );
}

module.exports = { Assembler, decode, encode, pushMessages };
