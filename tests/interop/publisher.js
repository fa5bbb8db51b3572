#!/usr/bin/env node
// Publish one signed task to wayang-mq and wait for its terminal result, written from
// docs/wire-format.md alone. Prints the result as JSON on stdout.
//
// Exit codes: 0 a SUCCESS result, 2 a FAILED result (printed too), 1 anything else (no queue
// serves the capability, a timeout, a result for the task that is not signed by a trusted key,
// whose key may not answer it, or that does not match docs/schema/wayang.result.v1.json), with
// the reason on stderr. A result with another token (a stale attempt's) is dropped.
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const amqp = require("amqplib");
const w = require("./lib/wire");

const USAGE = `usage: node publisher.js --url AMQP_URL (--key PRIVATE_KEY.pem | --new-key-dir DIR)
  --trust TRUSTED_KEY_DIR --capability CAP [--input JSON] [--reply-to ROUTING_KEY]
  [--timeout-s 30] [--queue-timeout-s 60] [--retry JSON] [--heartbeat-timeout-ms N]
  [--timeout-ms N] [--task-id ID] [--issuer NAME] [--audience wayang] [--not-before-in-ms N]
  --key          sign with this PKCS#8 PEM private key (as \`wayang-mq keys new\` writes it);
                 the issuer is the id of its scope (<stem>.toml beside it) unless --issuer
  --new-key-dir  sign with a new key, its public half and a dispatcher scope (id: the issuer,
                 the capability) written into DIR as <key id>.pub and <key id>.toml
  --trust        directory of the .pub keys (with their .toml scopes) trusted for results
  --audience     the deployment the task is for (default wayang)`;

const log = (message) => process.stderr.write(`publisher: ${message}\n`);

class Failure extends Error {}

function config(argv) {
  const args = w.parseArgs(argv, { usage: USAGE });
  for (const required of ["url", "trust", "capability"]) {
    if (!args[required]) throw new Failure(`--${required} is required\n${USAGE}`);
  }
  if (!args.key === !args["new-key-dir"])
    throw new Failure(`give one of --key and --new-key-dir\n${USAGE}`);
  let signer;
  let issuer = args.issuer;
  if (args.key) {
    signer = w.Signer.fromFile(args.key);
    // the issuer is the id the key's scope names (docs/security.md §4), if it has one beside it
    const scopeFile = args.key.replace(/\.key$/, ".toml");
    if (issuer === undefined && scopeFile !== args.key && fs.existsSync(scopeFile))
      issuer = w.parseScope(fs.readFileSync(scopeFile, "utf8")).id;
  } else {
    signer = w.Signer.generate();
    issuer ??= `node-publisher-${signer.keyId}`;
    const scope = new w.KeyScope("dispatcher", issuer, [args.capability]);
    const file = signer.publishPublicKey(args["new-key-dir"], scope);
    log(`new key ${signer.keyId} (${scope}): public key and scope written to ${file}`);
  }
  const optionalInt = (name) => (args[name] === undefined ? undefined : Number(args[name]));
  return {
    url: args.url,
    signer,
    trust: new w.KeyRing(args.trust, { log }),
    capability: args.capability,
    input: JSON.parse(args.input ?? "{}"),
    replyTo: args["reply-to"] ?? `reply.node-${crypto.randomUUID().slice(0, 8)}`,
    timeoutMs: Number(args["timeout-s"] ?? 30) * 1000,
    queueTimeoutMs: Number(args["queue-timeout-s"] ?? 60) * 1000,
    retry: args.retry === undefined ? undefined : JSON.parse(args.retry),
    heartbeatTimeoutMs: optionalInt("heartbeat-timeout-ms"),
    executionTimeoutMs: optionalInt("timeout-ms"),
    taskId: args["task-id"] ?? crypto.randomUUID(),
    issuer: issuer ?? "node-publisher",
    audience: args.audience ?? "wayang",
    notBeforeInMs: optionalInt("not-before-in-ms"),
  };
}

/** The §4.1 task body; fields at their default are left out, as the doc allows. */
function taskBody(cfg) {
  const now = w.nowMs();
  const body = {
    task_id: cfg.taskId,
    token: `tok-${crypto.randomUUID()}`,
    node_id: `node-${cfg.taskId}`.slice(0, 256),
    capability: cfg.capability,
    input: cfg.input,
    issued_at_ms: now,
    deadline_ms: now + cfg.queueTimeoutMs,
    audience: cfg.audience,
    reply_to: cfg.replyTo,
    issuer: cfg.issuer,
  };
  if (cfg.notBeforeInMs !== undefined) body.not_before_ms = now + cfg.notBeforeInMs;
  if (cfg.retry !== undefined) body.retry = cfg.retry;
  if (cfg.heartbeatTimeoutMs !== undefined) body.heartbeat_timeout_ms = cfg.heartbeatTimeoutMs;
  if (cfg.executionTimeoutMs !== undefined) body.timeout_ms = cfg.executionTimeoutMs;
  return body;
}

/** Publish the task (§1, §2, §3, §5), mandatory and confirmed. */
async function publishTask(channel, returns, cfg, validators, task) {
  const bytes = w.encode(task);
  const errors = w.schemaErrors(validators, w.TYPES.task, w.decode(bytes));
  if (errors.length) throw new Failure(`the task we built is invalid: ${errors.join("; ")}`);
  // signed over `wayang-mq/1 ed25519 wayang.task.v1 <key id>\n` and the body (§5)
  const options = w.properties(w.TYPES.task, task.task_id, cfg.signer, bytes, {
    replyTo: task.reply_to,
    expirationMs: task.deadline_ms - w.nowMs(), // the broker dead-letters it past its deadline
  });
  await w.publishConfirmed(channel, w.EXCHANGES.tasks, task.capability, bytes, {
    ...options,
    mandatory: true,
  });
  if (returns.take(w.EXCHANGES.tasks, task.capability, task.task_id))
    throw new Failure(`no queue serves ${task.capability} (basic.return): no_executor`);
  log(`published task ${task.task_id} to ${task.capability} as ${task.issuer} for ${task.audience}, key ${cfg.signer.keyId}`);
}

/** The result in `message` if it answers `task`; null to keep waiting; Failure if it is for
 * this task but cannot be trusted. §4.4: the signature (made for a result) and the key's right
 * to answer it come before anything else; then the schema; then the task id, token,
 * capability and node of our attempt (another token is a stale attempt's: dropped). */
function readResult(message, cfg, validators, task, state) {
  const { properties: p, content } = message;
  if (p.type !== w.TYPES.result) {
    log(`ignoring a ${p.type} message on the reply queue`);
    return null;
  }
  let signer;
  try {
    signer = cfg.trust.verify(content, p.headers ?? {}, w.TYPES.result);
  } catch (error) {
    if (!(error instanceof w.WireError)) throw error;
    throw new Failure(`result ${p.messageId} is not signed by a trusted key: ${error.code}: ${error.message}`);
  }
  const decoded = w.decode(content);
  const { view } = decoded;
  const errors = w.schemaErrors(validators, w.TYPES.result, decoded);
  // §4.4: `error` is required on FAILED and must be nil otherwise (JSON Schema does not say it)
  if ((view.status === "FAILED") !== (view.error != null))
    errors.push(`/error must be present exactly when status is FAILED (${view.status})`);
  if (errors.length) throw new Failure(`result does not match the schema: ${errors.join("; ")}`);
  try {
    w.checkResult(signer.scope, view);
  } catch (error) {
    if (!(error instanceof w.WireError)) throw error;
    throw new Failure(`result ${view.task_id} may not be signed by key ${signer.keyId}: ${error.code}: ${error.message}`);
  }
  if (view.task_id !== task.task_id) {
    log(`ignoring a result for another task ${view.task_id}`);
    return null;
  }
  // §4.4: a result always carries the task's token; another token, capability or node is a
  // stale attempt's
  if (view.token !== task.token || view.capability !== task.capability || view.node_id !== task.node_id) {
    log(`dropping a stale result (token ${view.token}, ${view.capability}, ${view.node_id})`);
    return null;
  }
  if (view.status === "PENDING") {
    state.started = true;
    log(`PENDING from ${view.executor_id}: waiting for the answer`);
    return null;
  }
  // §4.4: a FAILED token_expired for a task answered PENDING is a replayed copy's
  if (state.started && view.status === "FAILED" && view.error.code === "token_expired") {
    log(`dropping token_expired from ${view.executor_id}: the task started`);
    return null;
  }
  log(`${view.status} from ${view.executor_id}, signed by ${signer.keyId} (${signer.scope})`);
  return view;
}

async function main() {
  const cfg = config(process.argv.slice(2));
  const validators = w.loadValidators();
  const connection = await amqp.connect(cfg.url);
  try {
    const channel = await connection.createConfirmChannel();
    const returns = new w.Returns(channel);
    // §1: our own reply queue, bound to wayang.results with our reply_to
    const { queue } = await channel.assertQueue("", { exclusive: true, autoDelete: true });
    await channel.bindQueue(queue, w.EXCHANGES.results, cfg.replyTo);
    const task = taskBody(cfg);
    const state = { started: false };
    const answered = new Promise((resolve, reject) => {
      channel.consume(
        queue,
        (message) => {
          if (!message) return reject(new Failure("the reply queue was deleted"));
          try {
            const result = readResult(message, cfg, validators, task, state);
            if (result) resolve(result);
          } catch (error) {
            reject(error);
          }
        },
        { noAck: true },
      );
    });
    answered.catch(() => {}); // handled by the race below, even if it fails before the race
    await publishTask(channel, returns, cfg, validators, task);
    let timer;
    const timedOut = new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new Failure(`no terminal result within ${cfg.timeoutMs / 1000} s`)),
        cfg.timeoutMs,
      );
    });
    const result = await Promise.race([answered, timedOut]).finally(() => clearTimeout(timer));
    process.stdout.write(`${JSON.stringify(result)}\n`);
    return result.status === "SUCCESS" ? 0 : 2;
  } finally {
    await connection.close().catch(() => {});
  }
}

main().then(
  (code) => process.exit(code),
  (error) => {
    log(error instanceof Failure ? error.message : `failed: ${error.stack}`);
    process.exit(1);
  },
);
