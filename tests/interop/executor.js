#!/usr/bin/env node
// An executor daemon for wayang-mq, written from docs/wire-format.md alone (§7's procedure).
//
// Serves one capability (default `interop.upper`): answers `{text: input.text uppercased}`.
// On request it fails, to exercise retries and errors:
//   input.fail_until_attempt = N   attempts below N fail with a retryable executor_error
//   input.retry_after_ms = M       ... asking for at least M ms before the retry
//   input.fail = "permanent"       a non-retryable executor_error
//   input.sleep_ms = M             sleeps M ms first, sending progress (honours cancel/timeout)
//
// Prints "ready" on stdout once it consumes; logs to stderr; exits gracefully on SIGTERM.
"use strict";

const crypto = require("node:crypto");
const amqp = require("amqplib");
const w = require("./lib/wire");

const USAGE = `usage: node executor.js --url AMQP_URL --key PRIVATE_KEY.pem --key-dir TRUSTED_DIR
  [--capability interop.upper] [--id EXECUTOR_ID] [--prefetch 4] [--heartbeat-s 5]
  [--tiers 1s=1000,5s=5000,30s=30000,5m=300000] [--max-body-bytes 4194304]
  [--clock-skew-ms 300000] [--max-window-ms 604800000] [--grace-s 10]`;

const DEFAULT_TIERS = "1s=1000,5s=5000,30s=30000,5m=300000"; // §1: the default topology's

function config(argv) {
  const args = w.parseArgs(argv, { usage: USAGE });
  for (const required of ["url", "key", "key-dir"]) {
    if (!args[required]) throw new Error(`--${required} is required\n${USAGE}`);
  }
  const capability = args.capability ?? "interop.upper";
  return {
    url: args.url,
    signer: w.Signer.fromFile(args.key),
    keyDir: args["key-dir"],
    capability,
    executorId: args.id ?? `node-${capability.replaceAll(".", "-")}-${crypto.randomUUID().slice(0, 8)}`,
    prefetch: Number(args.prefetch ?? 4),
    heartbeatMs: Number(args["heartbeat-s"] ?? 5) * 1000,
    tiers: (args.tiers ?? DEFAULT_TIERS).split(",").map((tier) => {
      const [name, ms] = tier.split("=");
      return { name, delayMs: Number(ms) };
    }),
    maxBodyBytes: Number(args["max-body-bytes"] ?? 4194304),
    clockSkewMs: Number(args["clock-skew-ms"] ?? 300000),
    maxWindowMs: Number(args["max-window-ms"] ?? 7 * 24 * 3600 * 1000),
    graceMs: Number(args["grace-s"] ?? 10) * 1000,
  };
}

const log = (message) => process.stderr.write(`executor: ${message}\n`);

// -- the work itself: plain async code, told nothing about AMQP --------------------------------

async function upper(task, ctx) {
  const { input } = task;
  if (typeof input.text !== "string")
    throw new w.WireError("executor_error", "input.text must be a string");
  if (input.fail === "permanent") throw new w.WireError("executor_error", "failing on request");
  if (Number.isInteger(input.fail_until_attempt) && task.attempt < input.fail_until_attempt) {
    throw new w.WireError("executor_error", `failing attempt ${task.attempt} on request`, {
      retryable: true,
      retryAfterMs: Number.isInteger(input.retry_after_ms) ? input.retry_after_ms : null,
    });
  }
  if (Number.isInteger(input.sleep_ms) && input.sleep_ms > 0) {
    const steps = Math.max(1, Math.ceil(input.sleep_ms / 250));
    for (let step = 1; step <= steps; step++) {
      await ctx.sleep(input.sleep_ms / steps);
      await ctx.progress(step / steps, `slept ${step} of ${steps} steps`);
    }
  }
  return { text: input.text.toUpperCase() };
}

// -- defaults a reader fills back in (§4.1, §4.3) --------------------------------------------

function withDefaults(task) {
  return {
    input: {},
    policy: {},
    timeout_ms: null,
    heartbeat_timeout_ms: null,
    attempt: 1,
    reply_to: "",
    partition_key: null,
    idempotency_key: null,
    issuer: "",
    compensation: null,
    ...task,
    retry: {
      max_attempts: 1,
      initial_backoff_ms: 1000,
      backoff_multiplier: 2.0,
      max_backoff_ms: 300000,
      non_retryable: [],
      ...task.retry,
    },
  };
}

/** The §4.7 tier for a failed attempt: the longest not longer than the backoff, else the
 * shortest; null when no tier is configured. */
function retryTier(tiers, task, error) {
  if (tiers.length === 0) return null;
  const { initial_backoff_ms, backoff_multiplier, max_backoff_ms } = task.retry;
  let backoff = Math.min(
    initial_backoff_ms * backoff_multiplier ** (task.attempt - 1),
    max_backoff_ms,
  );
  if (error.retryAfterMs !== null && error.retryAfterMs > backoff) backoff = error.retryAfterMs;
  const sorted = [...tiers].sort((a, b) => a.delayMs - b.delayMs);
  const fitting = sorted.filter((tier) => tier.delayMs <= backoff);
  return fitting.length ? fitting[fitting.length - 1] : sorted[0];
}

// -- the daemon --------------------------------------------------------------------------------

class NodeExecutor {
  constructor(cfg) {
    this.cfg = cfg;
    this.keyring = new w.KeyRing(cfg.keyDir, { log });
    this.validators = w.loadValidators();
    this.running = new Map(); // "task_id/attempt" -> {promise, controller, task}
    this.recent = new Map(); // "task_id/attempt" -> the terminal result body answered
    this.cancels = new Map(); // task_id -> forget at (ms): cancels for tasks not received yet
    this.unsettled = 0;
    this.sequence = 0;
    this.stopping = false;
  }

  // -- start and stop --

  async start() {
    const { cfg } = this;
    this.connection = await amqp.connect(cfg.url);
    this.connection.on("error", (error) => log(`connection error: ${error.message}`));
    this.connection.on("close", () => this.lost("connection"));
    this.publisher = await this.connection.createConfirmChannel();
    this.publisher.on("close", () => this.lost("publishing channel"));
    this.returns = new w.Returns(this.publisher);
    this.consumer = await this.connection.createChannel();
    this.consumer.on("close", () => this.lost("consuming channel"));
    await this.consumer.prefetch(cfg.prefetch);
    await this.listenForCancels();
    await this.publishEvent(w.TYPES.registration, `registered.${cfg.executorId}`, cfg.executorId, {
      executor_id: cfg.executorId,
      capabilities: [cfg.capability],
      protocol: "amqp-0-9-1",
      metadata: { language: "javascript", runtime: `node ${process.version}` },
      concurrency: cfg.prefetch,
      version: "interop-1",
      started_at_ms: w.nowMs(),
    });
    this.heartbeatTimer = setInterval(() => this.heartbeat(), cfg.heartbeatMs);
    const queue = `wayang.task.${cfg.capability}`; // §1
    const { consumerTag } = await this.consumer.consume(queue, (m) => m && this.onDelivery(m), {
      noAck: false,
    });
    this.consumerTag = consumerTag;
    log(`${cfg.executorId} consuming ${queue} (key ${cfg.signer.keyId})`);
    process.stdout.write("ready\n");
  }

  lost(what) {
    if (this.stopping) return;
    // No reconnect loop here: a supervisor restarts us, and unacked deliveries come back.
    log(`${what} closed unexpectedly; exiting`);
    process.exit(1);
  }

  async stop() {
    if (this.stopping) return;
    this.stopping = true;
    log("stopping: no new deliveries, finishing the ones in hand");
    clearInterval(this.heartbeatTimer);
    await this.consumer.cancel(this.consumerTag).catch(() => {});
    const until = Date.now() + this.cfg.graceMs;
    while (this.unsettled > 0 && Date.now() < until) await sleep(50);
    // deliveries still unsettled are redelivered by the broker when we close
    await this.connection.close().catch(() => {});
  }

  // -- one delivery: decide an outcome, then settle it in one place --

  async onDelivery(message) {
    this.unsettled++;
    try {
      const outcome = await this.decide(message);
      await this.settle(message, outcome);
    } catch (error) {
      // publishing failed (not confirmed): the task comes back and is answered again (§7.8)
      log(`delivery not settled: ${error.message}; requeueing`);
      try {
        this.consumer.nack(message, false, true);
      } catch {
        // the channel is gone: the broker requeues every unacked delivery by itself
      }
    } finally {
      this.unsettled--;
    }
  }

  /** Steps 1-6 of §7, as a value: what to publish before the ack. */
  async decide(message) {
    let task; // stays undefined when the body cannot be read as a task
    try {
      task = this.open(message);
      this.check(task, message);
    } catch (error) {
      if (!(error instanceof w.WireError)) throw error;
      return { kind: "refuse", error, task };
    }
    const key = `${task.task_id}/${task.attempt}`;
    if (this.recent.has(key)) return this.recent.get(key); // answered already: the same answer
    if (this.running.has(key)) {
      const earlier = await this.running.get(key).promise; // two deliveries run once (§7.5)
      return earlier.kind === "answer" ? earlier : { kind: "ack" };
    }
    if (this.takeCancel(task.task_id)) {
      const error = new w.WireError("cancelled", "cancelled before it started");
      return this.failed(task, error);
    }
    return this.runTracked(key, task);
  }

  /** §7 steps 1-3: receive, verify, decode and check against the schema. */
  open(message) {
    const headers = message.properties.headers ?? {};
    if (w.headerString(headers, w.HEADERS.undecodable) !== undefined)
      throw new w.WireError("invalid_task", "properties could not be decoded");
    if (message.content.length > this.cfg.maxBodyBytes)
      throw new w.WireError("oversized", `body of ${message.content.length} bytes`);
    this.keyring.verify(message.content, headers);
    const decoded = w.decode(message.content);
    const { raw, view } = decoded;
    const errors = w.schemaErrors(this.validators, w.TYPES.task, decoded);
    // §4.1: deadline_ms >= issued_at_ms, which JSON Schema cannot say
    if (!errors.length && view.deadline_ms < view.issued_at_ms)
      errors.push("/deadline_ms is before issued_at_ms");
    if (errors.length) throw new w.WireError("invalid_task", errors.join("; ").slice(0, 1000));
    return { ...withDefaults(view), raw };
  }

  /** §7 step 4, in the doc's order; these refusals are answered with the task's own ids. */
  check(task, message) {
    const now = w.nowMs();
    const { cfg } = this;
    const refuse = (code, why) => {
      throw new w.WireError(code, why);
    };
    if (task.deadline_ms < now) refuse("token_expired", "the deadline has passed");
    if (task.issued_at_ms > now + cfg.clockSkewMs) refuse("invalid_task", "issued in the future");
    if (task.deadline_ms > now + cfg.maxWindowMs) refuse("invalid_task", "deadline too far");
    if (task.capability !== cfg.capability)
      refuse("no_executor", `capability ${task.capability} arrived on ${cfg.capability}'s queue`);
    const replyTo = message.properties.replyTo;
    if (replyTo && replyTo !== task.reply_to)
      refuse("invalid_task", "the AMQP reply_to differs from the body's");
  }

  async runTracked(key, task) {
    const controller = new AbortController();
    const promise = this.run(task, controller.signal);
    this.running.set(key, { promise, controller, task });
    try {
      return await promise;
    } finally {
      this.running.delete(key);
    }
  }

  /** §7 step 5: run, honouring timeout_ms and cancels; steps 6 and 7 decided from the error. */
  async run(task, signal) {
    const started = w.nowMs();
    const stopBeats = this.beatWhileRunning(task);
    let timer;
    const timedOut = new Promise((_, reject) => {
      if (task.timeout_ms !== null)
        timer = setTimeout(
          () => reject(new w.WireError("timeout", `ran over ${task.timeout_ms} ms`)),
          task.timeout_ms,
        );
    });
    const cancelled = new Promise((_, reject) => {
      signal.addEventListener("abort", () => reject(signal.reason));
    });
    try {
      const work = upper(task, this.context(task, signal));
      // the losers of the race may settle later: nobody waits for them any more
      for (const loser of [work, timedOut, cancelled]) loser.catch(() => {});
      const output = await Promise.race([work, timedOut, cancelled]);
      const metrics = { duration_ms: w.nowMs() - started, queue_ms: started - task.issued_at_ms };
      return this.answerOf(task, this.result(task, "SUCCESS", { output, metrics }));
    } catch (thrown) {
      const error =
        thrown instanceof w.WireError ? thrown : new w.WireError("executor_error", String(thrown));
      return this.afterFailure(task, error);
    } finally {
      clearTimeout(timer);
      stopBeats();
    }
  }

  /** §4.7: retry with attempts left, retries_exhausted on the last, else the error itself
   * (also when `tiersTakeIt` is false: no tier queue took the retry). */
  afterFailure(task, error, tiersTakeIt = true) {
    const { retry } = task;
    const retryable =
      error.retryable && error.code !== "cancelled" && !retry.non_retryable.includes(error.code);
    const attemptsLeft = task.attempt < retry.max_attempts;
    if (retryable && attemptsLeft && tiersTakeIt) return { kind: "retry", task, error };
    if (retryable && !attemptsLeft && retry.max_attempts > 1) {
      const exhausted = new w.WireError("retries_exhausted", `${retry.max_attempts} attempts`, {
        details: { last_error: error.toErrorMap() },
      });
      // the delivery is kept in the dead queue, and the answer is the final result
      return { kind: "refuse", error: exhausted, task, answer: this.failed(task, exhausted) };
    }
    return this.failed(task, error);
  }

  failed(task, error) {
    return this.answerOf(task, this.result(task, "FAILED", { error }));
  }

  /** An outcome answering `task` with `result` at its reply address (§1). */
  answerOf(task, result) {
    return { kind: "answer", result, to: task.reply_to || `noreply.${task.capability}` };
  }

  /** Publish what the outcome needs, wait for confirms, then ack: the one place that settles.
   * A publish that is not confirmed throws: onDelivery requeues the delivery (§7.8). */
  async settle(message, outcome) {
    switch (outcome.kind) {
      case "answer":
        await this.answer(outcome.result, outcome.to);
        this.remember(outcome);
        break;
      case "retry":
        if (!(await this.publishRetry(outcome.task, outcome.error))) {
          // no tier queue is bound for it: the failure is the final answer (§4.7)
          await this.settle(message, this.afterFailure(outcome.task, outcome.error, false));
          return;
        }
        break;
      case "refuse":
        // §7.7: the copy first; unconfirmed, the queue's own dead-lettering keeps the delivery
        // (no wayang-dead-lettered-by on that one: the reaper answers it)
        if (!(await this.deadLetter(message, outcome))) {
          this.consumer.reject(message, false);
          return;
        }
        if (outcome.error.code === "retries_exhausted") {
          await this.answer(outcome.answer.result, outcome.answer.to);
        } else {
          // the answer to refused input is a courtesy: the dead copy is what keeps the task
          await this.answerRefusal(message, outcome).catch((error) =>
            log(`answer to refused input not confirmed: ${error.message}`),
          );
        }
        break;
      case "ack":
        break;
      default:
        throw new Error(`unknown outcome ${outcome.kind}`);
    }
    this.consumer.ack(message);
  }

  // -- answers (§4.4, §7 step 8) --

  result(task, status, { output = null, error = null, metrics = {} } = {}) {
    return {
      task_id: task.task_id,
      token: task.token,
      node_id: task.node_id,
      capability: task.capability,
      status,
      executor_id: this.cfg.executorId,
      attempt: task.attempt,
      output,
      error: error ? error.toErrorMap() : null,
      metrics,
      logs: [],
      finished_at_ms: w.nowMs(),
    };
  }

  /** Publish a signed result to `routingKey` on wayang.results; resolves once confirmed. */
  async answer(result, routingKey) {
    const bytes = w.encode(result);
    const options = w.properties(w.TYPES.result, result.task_id, this.cfg.signer, bytes, {
      replyTo: routingKey,
    });
    await w.publishConfirmed(this.publisher, w.EXCHANGES.results, routingKey, bytes, options);
  }

  /** §4.4 "Which token a result carries": the task's ids, else only the AMQP properties. */
  async answerRefusal(message, { error, task }) {
    if (task) {
      const answer = this.failed(task, error);
      return this.answer(answer.result, answer.to);
    }
    const { messageId, correlationId, replyTo } = message.properties;
    const taskId = [messageId, correlationId].find((id) => w.usableId(id, 128));
    if (!taskId || !w.usableId(replyTo, 200)) return; // nobody to answer: the dead letter keeps it
    const unread = { task_id: taskId, token: "", node_id: "", capability: this.cfg.capability };
    return this.answer(this.result({ ...unread, attempt: 1 }, "FAILED", { error }), replyTo);
  }

  /** Keep the last 10,000 answers, so a redelivered task is answered, not run again. */
  remember(outcome) {
    const { task_id, attempt } = outcome.result;
    this.recent.set(`${task_id}/${attempt}`, outcome);
    if (this.recent.size > 10000) this.recent.delete(this.recent.keys().next().value);
  }

  // -- dead letters (§3, §7 step 7) --

  async deadLetter(message, { error, task }) {
    const { properties: p, content } = message;
    const taskId =
      task?.task_id ??
      [p.messageId, p.correlationId].find((id) => w.usableId(id, 128)) ??
      `unknown-${crypto.randomUUID()}`;
    const options = {
      contentType: p.contentType,
      type: p.type,
      replyTo: p.replyTo,
      messageId: taskId,
      correlationId: taskId,
      deliveryMode: 2,
      timestamp: Math.floor(Date.now() / 1000), // the time of death; and no expiration
      headers: {
        ...p.headers,
        [w.HEADERS.errorCode]: error.code,
        [w.HEADERS.errorMessage]: error.message.slice(0, 1000),
        [w.HEADERS.deadLetteredBy]: this.cfg.executorId,
      },
    };
    log(`dead-lettering ${taskId}: ${error.code} (${error.message})`);
    try {
      await w.publishConfirmed(this.publisher, w.EXCHANGES.dlx, this.cfg.capability, content, options);
      return true;
    } catch {
      return false;
    }
  }

  // -- retries (§4.7) --

  /** Publish the next attempt to its tier; false when no tier queue is bound for it. A tier
   * that is full nacks it: that throws, and the delivery is requeued until the queue's
   * delivery limit dead-letters it. */
  async publishRetry(task, error) {
    const tier = retryTier(this.cfg.tiers, task, error);
    if (!tier) return false;
    const now = w.nowMs();
    const next = {
      ...task.raw,
      attempt: task.attempt + 1,
      deadline_ms: now + tier.delayMs + (task.deadline_ms - task.issued_at_ms),
    };
    const bytes = w.encode(next);
    const routingKey = `retry.${tier.name}.${task.capability}`;
    const options = w.properties(w.TYPES.task, task.task_id, this.cfg.signer, bytes, {
      replyTo: task.reply_to,
      headers: { [w.HEADERS.partitionKey]: task.partition_key ?? task.task_id },
    });
    await w.publishConfirmed(this.publisher, w.EXCHANGES.retry, routingKey, bytes, {
      ...options,
      mandatory: true,
    });
    if (this.returns.take(w.EXCHANGES.retry, routingKey, task.task_id)) return false;
    log(`retrying ${task.task_id} attempt ${task.attempt + 1} through tier ${tier.name}`);
    // announced once the retry is safe; an announcement lost is not worth a second retry
    const announced = this.result(task, "FAILED", { error });
    await this.publishEvent(w.TYPES.result, `attempt.${task.task_id}`, task.task_id, announced)
      .catch((failure) => log(`failed attempt not announced: ${failure.message}`));
    return true;
  }

  // -- events (§4.5) --

  async publishEvent(type, routingKey, messageId, body) {
    const bytes = w.encode(body);
    const options = w.properties(type, messageId, this.cfg.signer, bytes);
    await w.publishConfirmed(this.publisher, w.EXCHANGES.events, routingKey, bytes, options);
  }

  heartbeat() {
    const inFlight = [...new Set([...this.running.values()].map((r) => r.task.task_id))];
    this.publishEvent(w.TYPES.heartbeat, `heartbeat.${this.cfg.executorId}`, this.cfg.executorId, {
      executor_id: this.cfg.executorId,
      capabilities: [this.cfg.capability],
      in_flight: inFlight,
      details: {},
      concurrency: this.cfg.prefetch,
      sequence: this.sequence++,
      sent_at_ms: w.nowMs(),
    }).catch((error) => log(`heartbeat not sent: ${error.message}`));
  }

  /** §7.5: with a heartbeat_timeout_ms, a heartbeat at once and then every third of it. */
  beatWhileRunning(task) {
    if (task.heartbeat_timeout_ms === null) return () => {};
    setImmediate(() => this.heartbeat()); // after the task is registered as running
    const timer = setInterval(() => this.heartbeat(), Math.max(100, task.heartbeat_timeout_ms / 3));
    return () => clearInterval(timer);
  }

  context(task, signal) {
    return {
      signal,
      sleep: (ms) =>
        new Promise((resolve, reject) => {
          if (signal.aborted) return reject(signal.reason);
          const timer = setTimeout(resolve, ms);
          signal.addEventListener("abort", () => {
            clearTimeout(timer);
            reject(signal.reason);
          });
        }),
      progress: (fraction, message) =>
        this.publishEvent(w.TYPES.progress, `progress.${task.task_id}`, task.task_id, {
          task_id: task.task_id,
          executor_id: this.cfg.executorId,
          attempt: task.attempt,
          fraction,
          message,
          details: {},
          sent_at_ms: w.nowMs(),
        }),
    };
  }

  // -- cancels (§4.6) --

  async listenForCancels() {
    const { queue } = await this.consumer.assertQueue("", { exclusive: true, autoDelete: true });
    await this.consumer.bindQueue(queue, w.EXCHANGES.control, "cancel.#");
    await this.consumer.consume(queue, (m) => m && this.onCancel(m), { noAck: true });
  }

  onCancel(message) {
    let cancel;
    try {
      this.keyring.verify(message.content, message.properties.headers ?? {});
      const decoded = w.decode(message.content);
      cancel = decoded.view;
      const errors = w.schemaErrors(this.validators, w.TYPES.cancel, decoded);
      if (errors.length) throw new Error(errors.join("; "));
    } catch (error) {
      log(`cancel dropped: ${error.message}`);
      return;
    }
    const reason = `cancelled: ${cancel.reason ?? ""}`.trim();
    let found = false;
    for (const run of this.running.values()) {
      if (run.task.task_id !== cancel.task_id) continue;
      run.controller.abort(new w.WireError("cancelled", reason));
      found = true;
    }
    if (!found) this.cancels.set(cancel.task_id, w.nowMs() + (cancel.forget_after_ms ?? 3600000));
  }

  takeCancel(taskId) {
    const now = w.nowMs();
    for (const [id, forgetAt] of this.cancels) if (forgetAt < now) this.cancels.delete(id);
    return this.cancels.delete(taskId);
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function main() {
  const executor = new NodeExecutor(config(process.argv.slice(2)));
  process.on("SIGTERM", () => executor.stop().then(() => process.exit(0)));
  process.on("SIGINT", () => executor.stop().then(() => process.exit(0)));
  process.on("SIGHUP", () => {
    executor.keyring.load(); // §5: a removed key is noticed on a reload
    log(`key directory reloaded: ${executor.keyring.keys.size} keys`);
  });
  await executor.start();
}

main().catch((error) => {
  log(`failed: ${error.message}`);
  process.exit(1);
});
