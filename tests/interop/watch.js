#!/usr/bin/env node
// Watch wayang-mq's results and events and check each message against docs/wire-format.md:
// its signature (§5, for the type where it was published, against a directory of trusted
// keys) and whether the key's scope may say it (§4.4, §4.5), its body against docs/schema (§4)
// and its AMQP properties (§2). Written from the doc alone.
//
// Binds `#` on each exchange, prints "ready" on stdout, then one JSON line per message:
//   {"exchange", "routing_key", "type", "message_id", "key_id", "errors": [...], "body"}
// `errors` is empty for a message that follows the doc. Exits 0 on SIGTERM.
"use strict";

const amqp = require("amqplib");
const w = require("./lib/wire");

const USAGE = `usage: node watch.js --url AMQP_URL --trust TRUSTED_KEY_DIR
  [--exchanges wayang.events,wayang.results]`;

const log = (message) => process.stderr.write(`watch: ${message}\n`);

// §2: what `message_id` holds, per message type
const SUBJECT = {
  [w.TYPES.registration]: "executor_id",
  [w.TYPES.heartbeat]: "executor_id",
  [w.TYPES.statusRequest]: "request_id",
  [w.TYPES.status]: "request_id",
};

/** The type a message must be, from where it was published (§1), as a receiver expects it:
 * the signature is checked for that type, never for the AMQP `type` property (§5). */
function expectedType(exchange, routingKey) {
  if (exchange === w.EXCHANGES.results) return w.TYPES.result;
  if (exchange === w.EXCHANGES.events) {
    const kind = routingKey.split(".")[0];
    return {
      registered: w.TYPES.registration,
      heartbeat: w.TYPES.heartbeat,
      progress: w.TYPES.progress,
      attempt: w.TYPES.result,
    }[kind];
  }
  return undefined;
}

/** Whether the key's scope lets it say what the message says (§4.4, §4.5). */
function scopeErrors(type, scope, body) {
  try {
    if (type === w.TYPES.result) w.checkResult(scope, body);
    else if (type === w.TYPES.registration || type === w.TYPES.heartbeat)
      w.checkExecutorEvent(scope, body.executor_id, body.capabilities);
    else if (type === w.TYPES.progress) w.checkExecutorEvent(scope, body.executor_id);
  } catch (error) {
    if (!(error instanceof w.WireError)) throw error;
    return [`signature: ${error.code}: ${error.message}`];
  }
  return [];
}

/** Every way `message` departs from the doc ([] when it follows it). */
function check(message, trust, validators) {
  const { fields, properties: p, content } = message;
  const errors = [];
  let signer = null;
  let body = null;
  const type = expectedType(fields.exchange, fields.routingKey) ?? p.type;
  if (p.type !== type) errors.push(`properties: type ${p.type}, published as a ${type}`);
  try {
    signer = trust.verify(content, p.headers ?? {}, type);
  } catch (error) {
    errors.push(`signature: ${error.code ?? ""}: ${error.message}`);
  }
  try {
    const decoded = w.decode(content);
    body = decoded.view;
    errors.push(...w.schemaErrors(validators, type, decoded).map((e) => `schema: ${e}`));
  } catch (error) {
    body = null;
    errors.push(`body: ${error.message}`);
  }
  if (type === w.TYPES.result && body && (body.status === "FAILED") !== (body.error != null))
    errors.push("schema: /error must be present exactly when status is FAILED");
  if (signer && body) errors.push(...scopeErrors(type, signer.scope, body));
  errors.push(...propertyErrors(fields, p, body));
  return { keyId: signer?.keyId ?? null, body, errors };
}

function propertyErrors(fields, p, body) {
  const errors = [];
  if (p.contentType !== "application/msgpack") errors.push(`content_type ${p.contentType}`);
  if (p.correlationId !== p.messageId) errors.push("correlation_id differs from message_id");
  const persistent = fields.exchange === w.EXCHANGES.control ? 1 : 2;
  if (p.deliveryMode !== persistent) errors.push(`delivery_mode ${p.deliveryMode}`);
  if (typeof p.timestamp !== "number") errors.push("no timestamp");
  if (body && p.messageId !== body[SUBJECT[p.type] ?? "task_id"])
    errors.push(`message_id ${p.messageId} is not the body's subject`);
  if (fields.exchange === w.EXCHANGES.results && p.replyTo !== fields.routingKey)
    errors.push(`reply_to ${p.replyTo} is not the routing key ${fields.routingKey}`);
  return errors.map((e) => `properties: ${e}`);
}

async function main() {
  const args = w.parseArgs(process.argv.slice(2), { usage: USAGE });
  if (!args.url || !args.trust) throw new Error(USAGE);
  const trust = new w.KeyRing(args.trust, { log });
  const validators = w.loadValidators();
  const exchanges = (args.exchanges ?? `${w.EXCHANGES.events},${w.EXCHANGES.results}`).split(",");
  const connection = await amqp.connect(args.url);
  const channel = await connection.createChannel();
  const { queue } = await channel.assertQueue("", { exclusive: true, autoDelete: true });
  for (const exchange of exchanges) await channel.bindQueue(queue, exchange, "#");
  await channel.consume(
    queue,
    (message) => {
      if (!message) return;
      const { keyId, body, errors } = check(message, trust, validators);
      const line = {
        exchange: message.fields.exchange,
        routing_key: message.fields.routingKey,
        type: message.properties.type ?? null,
        message_id: message.properties.messageId ?? null,
        key_id: keyId,
        errors,
        body,
      };
      process.stdout.write(`${JSON.stringify(line)}\n`);
    },
    { noAck: true },
  );
  const stop = () => connection.close().finally(() => process.exit(0));
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  process.stdout.write("ready\n");
}

main().catch((error) => {
  log(`failed: ${error.message}`);
  process.exit(1);
});
