#!/usr/bin/env node
// Watch wayang-mq's results and events and check each message against docs/wire-format.md:
// its signature (§5, against a directory of trusted keys), its body against docs/schema (§4)
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

/** Every way `message` departs from the doc ([] when it follows it). */
function check(message, trust, validators) {
  const { fields, properties: p, content } = message;
  const errors = [];
  let keyId = null;
  let body = null;
  try {
    keyId = trust.verify(content, p.headers ?? {});
  } catch (error) {
    errors.push(`signature: ${error.message}`);
  }
  try {
    const decoded = w.decode(content);
    body = decoded.view;
    errors.push(...w.schemaErrors(validators, p.type, decoded).map((e) => `schema: ${e}`));
  } catch (error) {
    errors.push(`body: ${error.message}`);
  }
  if (p.type === w.TYPES.result && body && (body.status === "FAILED") !== (body.error != null))
    errors.push("schema: /error must be present exactly when status is FAILED");
  errors.push(...propertyErrors(fields, p, body));
  return { keyId, body, errors };
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
