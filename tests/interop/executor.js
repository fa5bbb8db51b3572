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
// Tasks are verified as §5 and §7 say: the issuer's signature over the protected header and
// the body, the key's scope (a dispatcher's, as the task's issuer, for its capability), the
// audience, an attempt record if the task is a retry or a compensation (§4.7), the clocks,
// and whether this attempt was taken here before. Retries republish the issuer's bytes with
// an attempt record signed by this executor's key; nothing here ever signs a task.
//
// Prints "ready" on stdout once it consumes; logs to stderr; exits gracefully on SIGTERM.
"use strict";

const crypto = require("node:crypto");
const amqp = require("amqplib");
const w = require("./lib/wire");

const USAGE = `usage: node executor.js --url AMQP_URL --key PRIVATE_KEY.pem --key-dir TRUSTED_DIR
  [--capability interop.upper] [--id EXECUTOR_ID] [--prefetch 4] [--heartbeat-s 5]
  [--tiers 1s=1000,5s=5000,30s=30000,5m=300000] [--max-body-bytes 4194304]
  [--clock-skew-ms 300000] [--max-window-ms 604800000] [--grace-s 10] [--audience wayang]
  --key      this executor's private key; its scope (executor, --id, the capability) must be
             in the receivers' key directories, since it signs results, events and retries
  --key-dir  the public keys (and .toml scopes) it trusts: dispatchers' for tasks and
             cancels, executors' and the reaper's for attempt records (its own included)`;

const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

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
    audience: args.audience ?? "wayang",
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
    not_before_ms: null,
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

/** §4.7 attempt record defaults. */
function recordWithDefaults(record) {
  return { compensates: null, issued_at_ms: w.nowMs(), ...record };
}

/** §4.4 error map defaults (a record's `compensates`). */
function errorWithDefaults(error) {
  return { message: "", retryable: false, retry_after_ms: null, details: {}, ...error };
}

const sha256hex = (text) => crypto.createHash("sha256").update(text, "utf8").digest("hex");

/** §4.1 "A compensation task's ids": base + suffix, or the hash of the base when too long. */
function derivedId(base, suffix, maxBytes) {
  const joined = base + suffix;
  if (Buffer.byteLength(joined, "utf8") <= maxBytes) return joined;
  return sha256hex(base).slice(0, 32) + suffix;
}

/** The compensation task §4.1 derives from a failed task and its failure. */
function compensationOf(task, error) {
  const spec = task.compensation;
  if (!spec) return null;
  const taskId = derivedId(task.task_id, ".compensation", 128);
  return withDefaults({
    task_id: taskId,
    token: sha256hex(`${task.token}\u0000compensation`).slice(0, 32),
    node_id: spec.node_id ?? derivedId(task.node_id, ":compensate", 256),
    capability: spec.capability,
    input: { ...(spec.input ?? {}), compensates: { task_id: task.task_id, error } },
    retry: task.retry,
    issued_at_ms: task.issued_at_ms,
    deadline_ms: task.deadline_ms,
    audience: task.audience,
    reply_to: task.reply_to,
    idempotency_key: taskId,
    issuer: task.issuer,
  });
}

/** Attempts taken here (§7 step 5, docs/security.md §7): (task id, attempt, token) until an
 * hour past the attempt's deadline, at most 100,000. */
class Replays {
  constructor(limit = 100000) {
    this.limit = limit;
    this.taken = new Map();
  }

  /** Record the attempt; false when it repeats one taken before and is no redelivery. */
  take(task, redelivered) {
    const key = `${task.task_id}\u0000${task.attempt}\u0000${task.token}`;
    const until = this.taken.get(key);
    if (until !== undefined && !redelivered && w.nowMs() <= until) return false;
    this.taken.delete(key);
    this.taken.set(key, task.deadline_ms + 3600000);
    if (this.taken.size > this.limit) this.taken.delete(this.taken.keys().next().value);
    return true;
  }
}

/** A refusal the receiver may answer (§4.4 "What is answered"): the task verified and its
 * issuer was allowed to send it. Other refusals go to nobody. */
function answerable(code, why, task) {
  const error = new w.WireError(code, why);
  error.task = task;
  return error;
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
    this.cancels = new Map(); // task_id -> {forgetAt, scope}: cancels for tasks not received yet
    this.replays = new Replays();
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
    let task;
    try {
      task = this.open(message);
      this.check(task, message);
      if (!this.replays.take(task, message.fields.redelivered))
        throw new w.WireError("replayed", `attempt ${task.attempt} of ${task.task_id} was taken here before, and this copy is no redelivery`);
    } catch (error) {
      if (!(error instanceof w.WireError)) throw error;
      // only a refusal that carries the task is answered (§4.4), with the task's own ids
      return { kind: "refuse", error, task: error.task };
    }
    const key = `${task.task_id}/${task.attempt}`;
    if (this.recent.has(key)) return this.recent.get(key); // answered already: the same answer
    if (this.running.has(key)) {
      const earlier = await this.running.get(key).promise; // two deliveries run once (§7.5)
      // (answered, and compensated if need be, by the first delivery's settle)
      return earlier.kind === "answer" ? { ...earlier, task: undefined } : { kind: "ack" };
    }
    if (this.takeCancel(task)) {
      const error = new w.WireError("cancelled", "cancelled before it started");
      return this.failed(task, error);
    }
    return this.runTracked(key, task);
  }

  /** §7 steps 1-4: receive, verify, decode, check against the schema, check who sent it and
   * apply an attempt record. Returns the task to run (a retry's or compensation's derived);
   * none of these refusals carries the task, so none is answered. */
  open(message) {
    const headers = message.properties.headers ?? {};
    if (w.headerString(headers, w.HEADERS.undecodable) !== undefined)
      throw new w.WireError("invalid_task", "properties could not be decoded");
    if (message.content.length > this.cfg.maxBodyBytes)
      throw new w.WireError("oversized", `body of ${message.content.length} bytes`);
    // §5: over `wayang-mq/1 ed25519 wayang.task.v1 <key id>\n` + body, the type we expect
    const issuer = this.keyring.verify(message.content, headers, w.TYPES.task);
    const decoded = w.decode(message.content);
    const { view } = decoded;
    const errors = w.schemaErrors(this.validators, w.TYPES.task, decoded);
    // §4.1: deadline_ms >= issued_at_ms and not_before_ms <= deadline_ms (not in JSON Schema)
    if (!errors.length && view.deadline_ms < view.issued_at_ms)
      errors.push("/deadline_ms is before issued_at_ms");
    if (!errors.length && view.not_before_ms != null && view.not_before_ms > view.deadline_ms)
      errors.push("/not_before_ms is after deadline_ms");
    if (errors.length) throw new w.WireError("invalid_task", errors.join("; ").slice(0, 1000));
    const original = withDefaults(view);
    // §7 step 4: a dispatcher's key (or admin), as the task's issuer, for its capability
    w.checkTask(issuer.scope, original);
    if (original.audience !== this.cfg.audience)
      throw new w.WireError("wrong_audience", `task for ${original.audience}, this is ${this.cfg.audience}`);
    let task = original;
    let record = null;
    if (w.ATTEMPT_HEADERS.some((name) => headers[name] !== undefined)) {
      ({ task, record } = this.applyRecord(original, headers));
      // a compensation runs under its issuer's authority: its key must cover it (§4.7)
      if (!issuer.scope.covers(task.capability))
        throw new w.WireError("capability_not_allowed", `compensation for ${task.capability}, issued by ${issuer.scope}`);
    }
    return { ...task, delivered: { original, record, issuerKeyId: issuer.keyId } };
  }

  /** §4.7: verify the attempt record in the headers and derive the attempt it makes of the
   * issuer's task; WireError bad_attempt unless it holds. */
  applyRecord(original, headers) {
    const refuse = (why) => new w.WireError("bad_attempt", `attempt record of ${original.task_id}: ${why}`);
    const encoded = w.headerString(headers, w.HEADERS.attempt);
    if (encoded === undefined || encoded.length > 16384 || !BASE64.test(encoded))
      throw refuse("the wayang-attempt header is missing, too long or not base64");
    const packed = Buffer.from(encoded, "base64");
    let decider;
    let view;
    try {
      decider = this.keyring.verify(
        packed,
        {
          [w.HEADERS.keyId]: headers[w.HEADERS.attemptKeyId],
          [w.HEADERS.signature]: headers[w.HEADERS.attemptSignature],
        },
        w.TYPES.attempt,
      );
      const decoded = w.decode(packed);
      const errors = w.schemaErrors(this.validators, w.TYPES.attempt, decoded);
      if (errors.length) throw new w.WireError("invalid_task", errors.join("; "));
      view = decoded.view;
    } catch (error) {
      if (!(error instanceof w.WireError)) throw error;
      throw refuse(`${error.code}: ${error.message}`);
    }
    const record = recordWithDefaults(view);
    const { scope } = decider;
    const now = w.nowMs();
    if (!scope.is("executor", "reaper")) throw refuse(`signed by ${scope}: only executors and the reaper decide attempts`);
    if (!scope.speaksFor(record.executor_id)) throw refuse(`names executor ${record.executor_id}, signed by ${scope}`);
    if (scope.role === "executor" && !scope.covers(original.capability))
      throw refuse(`${scope} does not serve ${original.capability}`);
    if (record.task_id !== original.task_id) throw refuse(`it is for task ${record.task_id}`);
    if (record.issued_at_ms - now > this.cfg.clockSkewMs) throw refuse("it is issued in the future");
    let task = original;
    if (record.compensates !== null) {
      task = compensationOf(original, errorWithDefaults(record.compensates));
      if (!task) throw refuse("the task names no compensation");
      if (record.attempt < 1 || record.attempt > task.retry.max_attempts)
        throw refuse(`attempt ${record.attempt} is outside the compensation's 1..${task.retry.max_attempts}`);
    } else if (record.attempt < 2 || record.attempt > original.retry.max_attempts) {
      throw refuse(`attempt ${record.attempt} is outside 2..${original.retry.max_attempts}, the issuer's limit`);
    }
    const window = original.deadline_ms - original.issued_at_ms;
    if (record.deadline_ms > record.issued_at_ms + original.retry.max_backoff_ms + window)
      throw refuse("its deadline is later than the issuer's backoff and queue window allow");
    return { task: { ...task, attempt: record.attempt, deadline_ms: record.deadline_ms }, record };
  }

  /** §7 step 5, in the doc's order; these refusals carry the task: answered with its own ids. */
  check(task, message) {
    const now = w.nowMs();
    const { cfg } = this;
    const refuse = (code, why) => {
      throw answerable(code, why, task);
    };
    const starts = Math.max(task.issued_at_ms, task.not_before_ms ?? 0);
    if (starts - now > cfg.clockSkewMs)
      refuse("not_yet_valid", `not valid for another ${Math.floor((starts - now) / 1000)} s`);
    if (task.deadline_ms < now) refuse("token_expired", "the deadline has passed");
    if (task.deadline_ms - now > cfg.maxWindowMs) refuse("invalid_task", "deadline too far");
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
    return { kind: "answer", result, to: task.reply_to || `noreply.${task.capability}`, task };
  }

  /** Publish what the outcome needs, wait for confirms, then ack: the one place that settles.
   * A publish that is not confirmed throws: onDelivery requeues the delivery (§7.8). */
  async settle(message, outcome) {
    switch (outcome.kind) {
      case "answer":
        if (outcome.task) await this.compensate(message, outcome.task, outcome.result);
        await this.answer(outcome.result, outcome.to);
        this.remember(outcome);
        break;
      case "retry":
        if (!(await this.publishRetry(message, outcome.task, outcome.error))) {
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
          await this.compensate(message, outcome.task, outcome.answer.result);
          await this.answer(outcome.answer.result, outcome.answer.to);
        } else if (outcome.task) {
          // the answer to refused input is a courtesy: the dead copy is what keeps the task
          const answer = this.failed(outcome.task, outcome.error);
          await this.answer(answer.result, answer.to).catch((error) =>
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
    const bytes = w.encode(result); // signed as a wayang.result.v1 (§5)
    const options = w.properties(w.TYPES.result, result.task_id, this.cfg.signer, bytes, {
      replyTo: routingKey,
    });
    await w.publishConfirmed(this.publisher, w.EXCHANGES.results, routingKey, bytes, options);
  }

  /** Keep the last 10,000 answers, so a redelivered task is answered, not run again. */
  remember(outcome) {
    const { task_id, attempt } = outcome.result;
    this.recent.set(`${task_id}/${attempt}`, { ...outcome, task: undefined }); // compensated once
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
    if (w.SECURITY_CODES.includes(error.code) || !task) {
      const keyId = w.headerString(p.headers, w.HEADERS.keyId);
      log(`security.refused ${taskId}: ${error.code} (${error.message}) key_id=${keyId} answered=no`);
    } else log(`dead-lettering ${taskId}: ${error.code} (${error.message})`);
    try {
      await w.publishConfirmed(this.publisher, w.EXCHANGES.dlx, this.cfg.capability, content, options);
      return true;
    } catch {
      return false;
    }
  }

  // -- retries (§4.7) --

  /** Publish the next attempt to its tier (§4.7): the issuer's bytes and signature headers,
   * unchanged, with an attempt record signed by this executor's key. False when no tier queue
   * is bound for it. A tier that is full nacks it: that throws, and the delivery is requeued
   * until the queue's delivery limit dead-letters it. */
  async publishRetry(message, task, error) {
    const tier = retryTier(this.cfg.tiers, task, error);
    if (!tier) return false;
    const { original, record: delivered } = task.delivered;
    const now = w.nowMs();
    const record = {
      task_id: original.task_id,
      attempt: task.attempt + 1,
      // the issuer's queue window, counted from when it leaves the tier (§4.7 step 3)
      deadline_ms: now + tier.delayMs + (original.deadline_ms - original.issued_at_ms),
      executor_id: this.cfg.executorId,
      compensates: delivered?.compensates ?? null, // a retry of a compensation stays one
      issued_at_ms: now,
    };
    const routingKey = `retry.${tier.name}.${task.capability}`;
    const sent = await this.publishDerived(message, task, record, routingKey);
    if (!sent) return false;
    log(`retrying ${task.task_id} attempt ${task.attempt + 1} through tier ${tier.name}`);
    // announced once the retry is safe; an announcement lost is not worth a second retry
    const announced = this.result(task, "FAILED", { error });
    await this.publishEvent(w.TYPES.result, `attempt.${task.task_id}`, task.task_id, announced)
      .catch((failure) => log(`failed attempt not announced: ${failure.message}`));
    return true;
  }

  /** Publish the delivery's body (the issuer's task) with `record` to wayang.retry, as §4.7
   * step 4 says; `task` is the attempt the record makes. False when it came back unrouted. */
  async publishDerived(message, task, record, routingKey) {
    const headers = message.properties.headers ?? {};
    const recordBytes = w.encode(record);
    const recordSignature = this.cfg.signer.headers(recordBytes, w.TYPES.attempt);
    const partition = w.headerString(headers, w.HEADERS.partitionKey);
    const options = {
      contentType: "application/msgpack",
      type: w.TYPES.task,
      messageId: task.task_id,
      correlationId: task.task_id,
      deliveryMode: 2,
      timestamp: Math.floor(Date.now() / 1000), // and no expiration: it waits in a tier
      appId: "wayang-mq",
      headers: {
        [w.HEADERS.partitionKey]: partition ?? task.task_id,
        [w.HEADERS.keyId]: w.headerString(headers, w.HEADERS.keyId),
        [w.HEADERS.signature]: w.headerString(headers, w.HEADERS.signature),
        [w.HEADERS.attempt]: recordBytes.toString("base64"),
        [w.HEADERS.attemptKeyId]: recordSignature[w.HEADERS.keyId],
        [w.HEADERS.attemptSignature]: recordSignature[w.HEADERS.signature],
      },
      mandatory: true,
    };
    if (task.reply_to) options.replyTo = task.reply_to;
    await w.publishConfirmed(this.publisher, w.EXCHANGES.retry, routingKey, message.content, options);
    return !this.returns.take(w.EXCHANGES.retry, routingKey, task.task_id);
  }

  /** A task that failed for good and names a compensation: dispatch it before the answer
   * (§4.7 "Compensations"), through the shortest tier, and link it in the result. One that
   * cannot be dispatched is logged; the failure is answered either way. A compensation is not
   * compensated again. */
  async compensate(message, task, result) {
    if (result.status !== "FAILED" || !task.compensation || task.delivered?.record?.compensates)
      return;
    const { original } = task.delivered;
    const compensation = compensationOf(original, result.error);
    const tiers = [...this.cfg.tiers].sort((a, b) => a.delayMs - b.delayMs);
    try {
      if (!tiers.length) throw new Error("no retry tier configured");
      const now = w.nowMs();
      const record = {
        task_id: original.task_id,
        attempt: 1,
        deadline_ms: now + tiers[0].delayMs + (original.deadline_ms - original.issued_at_ms),
        executor_id: this.cfg.executorId,
        compensates: result.error,
        issued_at_ms: now,
      };
      const routingKey = `retry.${tiers[0].name}.${compensation.capability}`;
      if (!(await this.publishDerived(message, compensation, record, routingKey)))
        throw new Error(`unroutable: ${routingKey}`);
    } catch (error) {
      log(`compensation of ${task.task_id} not dispatched: ${error.message}`);
      return;
    }
    log(`compensation ${compensation.task_id} dispatched for ${task.task_id}`);
    result.compensation_task_id = compensation.task_id;
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

  /** §4.6: a cancel signed by a dispatcher key naming itself as `requester`, for a task it
   * issued (checked when the task arrives, if it has not yet), or by an admin key. */
  onCancel(message) {
    let cancel;
    let scope;
    try {
      ({ scope } = this.keyring.verify(message.content, message.properties.headers ?? {}, w.TYPES.cancel));
      const decoded = w.decode(message.content);
      const errors = w.schemaErrors(this.validators, w.TYPES.cancel, decoded);
      if (errors.length) throw new Error(errors.join("; "));
      cancel = { requester: "", ...decoded.view };
      if (scope.role !== "admin" && !(scope.role === "dispatcher" && scope.speaksFor(cancel.requester)))
        throw new w.WireError("key_not_allowed", `cancel by ${JSON.stringify(cancel.requester)} signed by ${scope}`);
    } catch (error) {
      log(`security.refused cancel dropped: ${error.code ?? ""} ${error.message}`);
      return;
    }
    const reason = `cancelled: ${cancel.reason ?? ""}`.trim();
    let found = false;
    for (const run of this.running.values()) {
      if (run.task.task_id !== cancel.task_id) continue;
      found = true;
      if (!cancelAllowed(scope, run.task)) {
        log(`security.refused cancel of ${cancel.task_id} by ${scope}: not its issuer`);
        continue;
      }
      run.controller.abort(new w.WireError("cancelled", reason));
    }
    if (!found)
      this.cancels.set(cancel.task_id, { forgetAt: w.nowMs() + (cancel.forget_after_ms ?? 3600000), scope });
  }

  /** Whether a cancel remembered for `task` applies to it (forgetting expired ones). */
  takeCancel(task) {
    const now = w.nowMs();
    for (const [id, { forgetAt }] of this.cancels) if (forgetAt < now) this.cancels.delete(id);
    const cancel = this.cancels.get(task.task_id);
    if (!cancel || !cancelAllowed(cancel.scope, task)) return false;
    return this.cancels.delete(task.task_id);
  }
}

/** An admin cancels any task; a dispatcher only the tasks it issued. */
function cancelAllowed(scope, task) {
  return scope.role === "admin" || task.issuer === scope.id;
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
