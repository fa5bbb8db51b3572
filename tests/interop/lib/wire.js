// The wayang-mq wire format, version 1, written from docs/wire-format.md and docs/schema/
// alone (no wayang_mq source was read to write it). Section numbers (§) are the doc's.
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");
const { Decoder, Encoder } = require("@msgpack/msgpack");
const Ajv2020 = require("ajv/dist/2020");

// -- §1: where messages go ---------------------------------------------------------------

const EXCHANGES = Object.freeze({
  tasks: "wayang.tasks",
  results: "wayang.results",
  events: "wayang.events",
  control: "wayang.control",
  retry: "wayang.retry",
  dlx: "wayang.dlx",
});

const CONTENT_TYPE = "application/msgpack";
const APP_ID = "wayang-mq"; // §2: "any value is accepted"; we say who we are in metadata
const TYPES = Object.freeze({
  task: "wayang.task.v1",
  result: "wayang.result.v1",
  registration: "wayang.registration.v1",
  heartbeat: "wayang.heartbeat.v1",
  progress: "wayang.progress.v1",
  cancel: "wayang.cancel.v1",
  statusRequest: "wayang.status-request.v1",
  status: "wayang.status.v1",
  attempt: "wayang.attempt.v1", // travels in headers (§3, §4.7)
});

// §3
const HEADERS = Object.freeze({
  keyId: "wayang-key-id",
  signature: "wayang-signature",
  partitionKey: "x-partition-key",
  errorCode: "wayang-error-code",
  errorMessage: "wayang-error-message",
  deadLetteredBy: "wayang-dead-lettered-by",
  undecodable: "wayang-undecodable",
  headersDropped: "wayang-headers-dropped",
  attempt: "wayang-attempt",
  attemptKeyId: "wayang-attempt-key-id",
  attemptSignature: "wayang-attempt-signature",
});

/** The three headers of an attempt record (§3, §4.7). */
const ATTEMPT_HEADERS = Object.freeze([
  HEADERS.attempt,
  HEADERS.attemptKeyId,
  HEADERS.attemptSignature,
]);

// §6, and the schemas' ErrorCode enum
const ERROR_CODES = Object.freeze([
  "timeout",
  "cancelled",
  "invalid_task",
  "bad_signature",
  "token_expired",
  "no_executor",
  "delivery_limit",
  "executor_error",
  "invalid_result",
  "oversized",
  "retries_exhausted",
  "backpressure",
  "unknown_key",
  "key_not_allowed",
  "capability_not_allowed",
  "wrong_audience",
  "not_yet_valid",
  "replayed",
  "bad_attempt",
]);

/** Refusals about who sent a message (§4.4 "What is answered"): never answered. */
const SECURITY_CODES = Object.freeze([
  "bad_signature",
  "unknown_key",
  "key_not_allowed",
  "capability_not_allowed",
  "wrong_audience",
  "replayed",
  "bad_attempt",
]);

/** A refusal or failure that carries its §6 code (and whether trying again may help). */
class WireError extends Error {
  constructor(code, message, { retryable = false, retryAfterMs = null, details = {} } = {}) {
    super(message);
    if (!ERROR_CODES.includes(code)) throw new Error(`unknown error code ${code}`);
    this.code = code;
    this.retryable = retryable;
    this.retryAfterMs = retryAfterMs;
    this.details = details;
  }

  /** The §4.4 `error` map. */
  toErrorMap() {
    return {
      code: this.code,
      message: this.message.slice(0, 1000),
      retryable: this.retryable,
      retry_after_ms: this.retryAfterMs,
      details: this.details,
    };
  }
}

// -- §4: bodies ------------------------------------------------------------------------------

const MAX_SAFE = Number.MAX_SAFE_INTEGER; // §4: integers are at most 2^53 - 1
// Where a decoded body holds msgpack `bin`, the JSON view for schema validation holds an
// object with this one key. Schemas are rewritten (below) so that no `"type": "object"` place
// accepts it: §4 says bin is not a string and not a map, and appears only where any value may.
const BIN_KEY = "\u0000msgpack-bin";

/** A msgpack float as decoded: §4 refuses `1.0` where an integer is required, and a plain
 * JavaScript number cannot tell `1.0` from `1`. Re-encoded as a float (a retry keeps the body). */
class MsgpackFloat {
  constructor(value) {
    this.value = value;
  }
}

// @msgpack/msgpack has no hook for floats: these override its float reader and its encoder's
// dispatch (methods of the pinned version, 3.1.3; tests/interop's tests catch a change).
class FloatKeepingDecoder extends Decoder {
  readF32() {
    return new MsgpackFloat(super.readF32());
  }

  readF64() {
    return new MsgpackFloat(super.readF64());
  }
}

class FloatKeepingEncoder extends Encoder {
  doEncode(object, depth) {
    if (object instanceof MsgpackFloat) this.encodeNumberAsFloat(object.value);
    else super.doEncode(object, depth);
  }
}

const decoder = new FloatKeepingDecoder({
  // §4: "map with string keys"; the library's default would turn an integer key into a string
  mapKeyConverter: (key) => {
    if (typeof key !== "string") throw new WireError("invalid_task", "a map key is not a string");
    return key;
  },
});
const encoder = new FloatKeepingEncoder({ ignoreUndefined: true });

/** msgpack bytes of a body (a plain object). */
function encode(body) {
  return Buffer.from(encoder.encode(body));
}

/** The decoded body (bin stays Uint8Array, floats MsgpackFloat: `raw`, to encode again) and
 * its JSON view (for schemas and printing), with the JSON pointers of integral floats. */
function decode(bytes) {
  let raw;
  try {
    raw = decoder.decode(bytes);
  } catch (error) {
    if (error instanceof WireError) throw error;
    throw new WireError("invalid_task", `the body is not msgpack: ${error.message}`);
  }
  if (raw === null || typeof raw !== "object" || Array.isArray(raw) || raw instanceof Uint8Array)
    throw new WireError("invalid_task", "the body is not a msgpack map");
  const integralFloats = new Set();
  return { raw, view: jsonView(raw, "", integralFloats), integralFloats };
}

/** A JSON-compatible copy: bin becomes {BIN_KEY: base64}; NaN and infinities are refused;
 * where a float holds an integral value, its JSON pointer goes into `integralFloats`. */
function jsonView(value, pointer = "", integralFloats = new Set()) {
  if (value instanceof MsgpackFloat) {
    if (!Number.isFinite(value.value))
      throw new WireError("invalid_task", "NaN and infinities are refused (section 4)");
    if (Number.isInteger(value.value)) integralFloats.add(pointer);
    return value.value;
  }
  if (value instanceof Uint8Array) return { [BIN_KEY]: Buffer.from(value).toString("base64") };
  if (Array.isArray(value)) return value.map((v, i) => jsonView(v, `${pointer}/${i}`, integralFloats));
  if (typeof value === "bigint") throw new WireError("invalid_task", "integer out of range");
  if (value !== null && typeof value === "object") {
    if (!(value.constructor === Object || Object.getPrototypeOf(value) === null))
      throw new WireError("invalid_task", `unsupported msgpack value ${value.constructor.name}`);
    const entries = Object.entries(value).map(([k, v]) => {
      const escaped = k.replaceAll("~", "~0").replaceAll("/", "~1"); // JSON pointer (RFC 6901)
      return [k, jsonView(v, `${pointer}/${escaped}`, integralFloats)];
    });
    return Object.fromEntries(entries);
  }
  return value;
}

// A lone surrogate cannot be encoded as UTF-8 (String.prototype.isWellFormed needs Node 20;
// Debian 12 ships Node 18)
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;
const wellFormed = (text) => !LONE_SURROGATE.test(text);

const SCHEMA_DIR = path.resolve(__dirname, "..", "..", "..", "docs", "schema");

/** Every `"type": "object"` place refuses the bin marker (see BIN_KEY), and every
 * `"type": "integer"` place a msgpack float (see MsgpackFloat). */
function strictMsgpackTypes(schema) {
  if (Array.isArray(schema)) return schema.map(strictMsgpackTypes);
  if (schema === null || typeof schema !== "object") return schema;
  const entries = Object.entries(schema).map(([k, v]) => [k, strictMsgpackTypes(v)]);
  const out = Object.fromEntries(entries);
  if (out.type === "object") out.propertyNames = { not: { const: BIN_KEY } };
  if (out.type === "integer") out[NOT_A_FLOAT] = true;
  return out;
}

const NOT_A_FLOAT = "x-msgpack-not-float";
let integralFloatsNow = new Set(); // the pointers of the view being validated (synchronously)

/** Compiled validators by message type, from docs/schema (JSON Schema 2020-12). */
function loadValidators(schemaDir = SCHEMA_DIR) {
  const ajv = new Ajv2020({ allErrors: true, strict: true });
  // §4 "Ids are bounded in UTF-8 bytes ... no lone surrogates": the schemas' annotation
  ajv.addKeyword({
    keyword: "x-max-utf8-bytes",
    type: "string",
    schemaType: "number",
    errors: false,
    validate: (max, data) => wellFormed(data) && Buffer.byteLength(data, "utf8") <= max,
  });
  ajv.addKeyword({
    keyword: NOT_A_FLOAT,
    type: "number",
    schemaType: "boolean",
    errors: false,
    validate: (_, data, parent, where) => !integralFloatsNow.has(where.instancePath),
  });
  const validators = {};
  for (const file of fs.readdirSync(schemaDir).filter((f) => f.endsWith(".json"))) {
    const schema = strictMsgpackTypes(JSON.parse(fs.readFileSync(path.join(schemaDir, file))));
    validators[path.basename(file, ".json")] = ajv.compile(schema);
  }
  for (const type of Object.values(TYPES)) {
    if (!validators[type]) throw new Error(`no schema for ${type} in ${schemaDir}`);
  }
  return validators;
}

/** The schema errors of a decoded body as `type`, as readable strings ([] when valid). */
function schemaErrors(validators, type, { view, integralFloats = new Set() }) {
  const validate = validators[type];
  if (!validate) return [`no schema for message type ${JSON.stringify(type)}`];
  integralFloatsNow = integralFloats;
  try {
    if (validate(view)) return [];
  } finally {
    integralFloatsNow = new Set();
  }
  return validate.errors.map((e) => `${e.instancePath || "/"} ${e.message}`);
}

// -- §5: signing and keys --------------------------------------------------------------------

const SIGNATURE_VERSION = "wayang-mq/1";
const ALGORITHM = "ed25519";

/** The bytes an Ed25519 signature covers (§5 step 2): the ASCII line
 * `wayang-mq/1 ed25519 <type> <key id>`, a line feed, then the exact body bytes. */
function signingInput(type, keyId, body) {
  if (!type || !/^[\x21-\x7e]+$/.test(type)) throw new Error(`not a message type: ${type}`);
  if (!/^[\x21-\x7e]+$/.test(keyId)) throw new Error("a key id is printable ASCII");
  const header = Buffer.from(`${SIGNATURE_VERSION} ${ALGORITHM} ${type} ${keyId}\n`, "ascii");
  return Buffer.concat([header, body]);
}

/** The key id: the first 16 hex digits of SHA-256 over the raw 32-byte public key. */
function keyIdOf(publicKey) {
  const raw = Buffer.from(publicKey.export({ format: "jwk" }).x, "base64url");
  return crypto.createHash("sha256").update(raw).digest("hex").slice(0, 16);
}

// -- scopes (§5 "Who signs what", docs/security.md §4) --

const ROLES = Object.freeze(["dispatcher", "executor", "reaper", "control-plane", "admin"]);
const CAPABILITY = /^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*$/; // §1

/** A capability pattern of a scope: a capability, `prefix.*` or `*`. */
function validPattern(pattern) {
  if (pattern === "*") return true;
  const name = pattern.endsWith(".*") ? pattern.slice(0, -2) : pattern;
  return name.length <= 128 && CAPABILITY.test(name) && !name.startsWith("retry.");
}

/** What one key may sign: its role, the id it signs as, the capabilities it covers. */
class KeyScope {
  constructor(role, id, capabilities) {
    if (!ROLES.includes(role)) throw new Error(`role must be one of ${ROLES.join(", ")}`);
    if (typeof id !== "string" || !id) throw new Error("id must be a non-empty string");
    if (!Array.isArray(capabilities) || !capabilities.every((c) => typeof c === "string" && validPattern(c)))
      throw new Error("capabilities must be capability names, 'prefix.*' or '*'");
    this.role = role;
    this.id = id;
    this.capabilities = Object.freeze([...capabilities]);
    Object.freeze(this);
  }

  /** The key holds one of `roles` (an admin key holds every role). */
  is(...roles) {
    return this.role === "admin" || roles.includes(this.role);
  }

  /** The key may sign as `id` (an admin key signs as anyone). */
  speaksFor(id) {
    return this.role === "admin" || this.id === id;
  }

  /** The key may speak about tasks of `capability`: an exact name, `prefix.*` (any
   * capability under the prefix) or `*`. */
  covers(capability) {
    return this.capabilities.some(
      (p) =>
        p === "*" ||
        p === capability ||
        (p.endsWith(".*") && capability.startsWith(p.slice(0, -1)) && capability.length > p.length - 1),
    );
  }

  toString() {
    return `${this.role} ${this.id} [${this.capabilities.join(",")}]`;
  }

  /** The scope file's text (docs/security.md §4). */
  toToml() {
    const caps = this.capabilities.map((c) => JSON.stringify(c)).join(", ");
    return `role = ${JSON.stringify(this.role)}\nid = ${JSON.stringify(this.id)}\ncapabilities = [${caps}]\n`;
  }
}

/** Parse a scope file: the tiny subset of TOML a scope is (`role = "..."`, `id = "..."`,
 * `capabilities = ["...", ...]`, comments, basic or literal strings, an array over several
 * lines). Anything else is an error, and so is a missing role or id; a missing
 * `capabilities` means `["*"]` (as wayang-mq reads it; the doc does not say). */
function parseScope(text) {
  let i = 0;
  const fail = (why) => {
    const line = text.slice(0, i).split("\n").length;
    throw new Error(`line ${line}: ${why}`);
  };
  const skip = (newlines) => {
    for (;;) {
      if (text[i] === " " || text[i] === "\t" || (newlines && (text[i] === "\n" || text[i] === "\r"))) i++;
      else if (text[i] === "#") while (i < text.length && text[i] !== "\n") i++;
      else return;
    }
  };
  const string = () => {
    const quote = text[i];
    if (quote !== '"' && quote !== "'") fail("expected a string");
    i++;
    let out = "";
    while (i < text.length && text[i] !== quote) {
      const c = text[i++];
      if (c === "\n") fail("a string ends on its line");
      if (c !== "\\" || quote === "'") {
        out += c;
        continue;
      }
      const e = text[i++];
      const simple = { b: "\b", t: "\t", n: "\n", f: "\f", r: "\r", '"': '"', "\\": "\\" };
      if (e in simple) out += simple[e];
      else if (e === "u" || e === "U") {
        const digits = text.slice(i, i + (e === "u" ? 4 : 8));
        if (!/^[0-9a-fA-F]+$/.test(digits) || digits.length !== (e === "u" ? 4 : 8)) fail("bad escape");
        out += String.fromCodePoint(parseInt(digits, 16));
        i += digits.length;
      } else fail(`bad escape \\${e}`);
    }
    if (text[i] !== quote) fail("unterminated string");
    i++;
    return out;
  };
  const values = {};
  for (;;) {
    skip(true);
    if (i >= text.length) break;
    const start = i;
    while (i < text.length && /[A-Za-z0-9_-]/.test(text[i])) i++;
    const key = text.slice(start, i);
    if (!key) fail("expected a key");
    if (!["role", "id", "capabilities"].includes(key)) fail(`unknown key ${key}`);
    if (key in values) fail(`${key} given twice`);
    skip(false);
    if (text[i++] !== "=") fail(`expected = after ${key}`);
    skip(false);
    if (key === "capabilities") {
      if (text[i++] !== "[") fail("capabilities is an array");
      const items = [];
      for (;;) {
        skip(true);
        if (text[i] === "]") break;
        items.push(string());
        skip(true);
        if (text[i] === ",") i++;
        else if (text[i] !== "]") fail("expected , or ]");
      }
      i++;
      values[key] = items;
    } else values[key] = string();
    skip(false);
    if (i < text.length && text[i] !== "\n" && text[i] !== "\r") fail("one key per line");
  }
  return new KeyScope(values.role, values.id, values.capabilities ?? ["*"]);
}

/** The scope file of a public key file: `<stem>.toml` beside `<stem>.pub`. */
const scopePath = (publicKeyFile) => publicKeyFile.replace(/\.pub$/, ".toml");

/** A private key that signs messages: loaded from PKCS#8 PEM, or new. */
class Signer {
  constructor(privateKey) {
    if (privateKey.asymmetricKeyType !== "ed25519") throw new Error("not an Ed25519 key");
    this.privateKey = privateKey;
    this.publicKey = crypto.createPublicKey(privateKey);
    this.keyId = keyIdOf(this.publicKey);
  }

  static fromFile(file) {
    return new Signer(crypto.createPrivateKey(fs.readFileSync(file)));
  }

  static generate() {
    return new Signer(crypto.generateKeyPairSync("ed25519").privateKey);
  }

  /** The 64-byte signature of `body` as a message of `type` (§5). */
  sign(body, type) {
    return crypto.sign(null, signingInput(type, this.keyId, body), this.privateKey); // pure Ed25519
  }

  /** The §3 headers for `body` (the exact bytes that are published) as a `type` message. */
  headers(body, type) {
    const signature = this.sign(body, type).toString("base64");
    return { [HEADERS.keyId]: this.keyId, [HEADERS.signature]: signature };
  }

  /** Put the public key and its scope into a receiver's key directory, as §5 "Rotation" and
   * docs/security.md §4 say: each written under another name and renamed into place, the
   * scope first, so no receiver reads half a file or a key without its scope. */
  publishPublicKey(directory, scope) {
    fs.mkdirSync(directory, { recursive: true });
    const place = (name, text) => {
      const partial = path.join(directory, `.${name}.partial`);
      fs.writeFileSync(partial, text);
      fs.renameSync(partial, path.join(directory, name));
    };
    if (scope) place(`${this.keyId}.toml`, scope.toToml());
    place(`${this.keyId}.pub`, this.publicKey.export({ type: "spki", format: "pem" }));
    return path.join(directory, `${this.keyId}.pub`);
  }

  /** Write the private key as PKCS#8 PEM, mode 0600 (§5 "Key files"). */
  writePrivateKey(file) {
    const pem = this.privateKey.export({ type: "pkcs8", format: "pem" });
    fs.writeFileSync(file, pem, { mode: 0o600 });
  }
}

/** Header values may arrive as AMQP longstr (bytes) or shortstr (§3). */
function headerString(headers, name) {
  const value = headers?.[name];
  if (typeof value === "string") return value;
  if (Buffer.isBuffer(value)) return value.toString("utf8");
  return undefined;
}

const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** The public keys of a directory of `*.pub` files, each with its scope (`<stem>.toml`; a
 * key without a readable one is trusted for nothing). Read again when an unknown key id
 * signs and the directory changed since the last read (a key renamed into place, §5), and at
 * most once a second while verifying otherwise, so a removed key stops verifying within
 * about a second. */
class KeyRing {
  constructor(directory, { reloadIntervalMs = 1000, log = () => {} } = {}) {
    this.directory = directory;
    this.reloadIntervalMs = reloadIntervalMs;
    this.log = log;
    this.keys = new Map(); // key id -> {key, scope (KeyScope or null)}
    this.lastLoad = 0;
    this.load();
  }

  /** Read the directory again (SIGHUP, a change seen while verifying). */
  load() {
    this.stamp = this.directoryStamp(); // before reading: a change meanwhile is seen next time
    this.lastLoad = Date.now();
    const keys = new Map();
    let files = [];
    try {
      files = fs.readdirSync(this.directory).filter((f) => f.endsWith(".pub"));
    } catch (error) {
      this.log(`cannot read key directory ${this.directory}: ${error.message}`);
      return; // keep the keys already loaded
    }
    for (const file of files.sort()) {
      const where = path.join(this.directory, file);
      let key;
      try {
        key = crypto.createPublicKey(fs.readFileSync(where));
        if (key.asymmetricKeyType !== "ed25519") throw new Error("not an Ed25519 key");
      } catch (error) {
        this.log(`skipping ${file}: ${error.message}`);
        continue;
      }
      let scope = null;
      try {
        scope = parseScope(fs.readFileSync(scopePath(where), "utf8"));
      } catch (error) {
        this.log(`key ${keyIdOf(key)} (${file}) is trusted for nothing: scope ${error.message}`);
      }
      keys.set(keyIdOf(key), { key, scope });
    }
    this.keys = keys;
  }

  directoryStamp() {
    try {
      return fs.statSync(this.directory, { bigint: true }).mtimeNs;
    } catch {
      return null;
    }
  }

  /** The entry for `keyId`: the directory is read again when it changed, at once for an
   * unknown key id, at most once a second for a known one (a revoked key). */
  find(keyId) {
    const due = Date.now() - this.lastLoad >= this.reloadIntervalMs;
    if ((due || !this.keys.has(keyId)) && this.directoryStamp() !== this.stamp) {
      const known = this.keys.has(keyId);
      this.load();
      if (!known && this.keys.has(keyId)) this.log(`trusting new key ${keyId} from ${this.directory}`);
    } else if (due) this.lastLoad = Date.now();
    return this.keys.get(keyId);
  }

  /** Who signed `body` as a `type` message: {keyId, scope}. Refuses with WireError
   * bad_signature (no signature, or one that does not match), unknown_key (a key id not in
   * the directory) or key_not_allowed (a key without a scope). */
  verify(body, headers, type) {
    const keyId = headerString(headers, HEADERS.keyId);
    const signature = headerString(headers, HEADERS.signature);
    if (!keyId || !signature) throw new WireError("bad_signature", "missing signature");
    const entry = this.find(keyId);
    if (!entry) throw new WireError("unknown_key", `unknown key id ${keyId.slice(0, 64)}`);
    const bytes = BASE64.test(signature) ? Buffer.from(signature, "base64") : Buffer.alloc(0);
    if (bytes.length !== 64) throw new WireError("bad_signature", "signature is not 64 bytes");
    if (!crypto.verify(null, signingInput(type, keyId, body), entry.key, bytes))
      throw new WireError("bad_signature", `signature does not match (key id ${keyId})`);
    if (!entry.scope)
      throw new WireError("key_not_allowed", `key ${keyId} has no scope: trusted for nothing`);
    return { keyId, scope: entry.scope };
  }
}

// -- what a key may sign (§5 "Who signs what", docs/security.md §4) --

/** May `scope` sign this result? An executor as itself for its capabilities, the reaper
 * FAILED as itself, a dispatcher only the FAILED of its own deadline as `dispatcher:<id>`,
 * an admin anything. Throws WireError key_not_allowed / capability_not_allowed. */
function checkResult(scope, result) {
  if (scope.role === "admin") return;
  if (scope.role === "executor") {
    if (!scope.speaksFor(result.executor_id))
      throw new WireError("key_not_allowed", `result names executor ${result.executor_id}, signed by ${scope}`);
    if (!scope.covers(result.capability))
      throw new WireError("capability_not_allowed", `result for ${result.capability}, signed by ${scope}`);
    return;
  }
  const own = { reaper: scope.id, dispatcher: `dispatcher:${scope.id}` }[scope.role];
  if (own === undefined || result.executor_id !== own || result.status !== "FAILED")
    throw new WireError(
      "key_not_allowed",
      `a ${result.status} result by ${result.executor_id} may not be signed by ${scope}`,
    );
}

/** May `scope` sign an event (registration, heartbeat, progress, status report) of
 * `executorId` claiming `capabilities`? An executor as itself, for its capabilities. */
function checkExecutorEvent(scope, executorId, capabilities = []) {
  if (!scope.is("executor") || !scope.speaksFor(executorId))
    throw new WireError("key_not_allowed", `an event of ${executorId} may not be signed by ${scope}`);
  for (const capability of capabilities) {
    if (!scope.covers(capability))
      throw new WireError("capability_not_allowed", `${executorId} claims ${capability}, signed by ${scope}`);
  }
}

/** May `scope` sign this task? A dispatcher (or admin) key, as its `issuer`, covering its
 * capability (§7 step 4). */
function checkTask(scope, task) {
  if (!scope.is("dispatcher"))
    throw new WireError("key_not_allowed", `task ${task.task_id} signed by ${scope}: only dispatchers sign tasks`);
  if (!scope.speaksFor(task.issuer))
    throw new WireError("key_not_allowed", `task ${task.task_id} names issuer ${JSON.stringify(task.issuer)}, signed by ${scope}`);
  if (!scope.covers(task.capability))
    throw new WireError("capability_not_allowed", `task ${task.task_id} is for ${task.capability}, signed by ${scope}`);
}

// -- §2: AMQP properties -----------------------------------------------------------------------

/** The publish options (amqplib) of §2 for a signed body. */
function properties(type, messageId, signer, body, { replyTo, expirationMs, headers } = {}) {
  const options = {
    contentType: CONTENT_TYPE,
    type,
    messageId,
    correlationId: messageId,
    deliveryMode: 2,
    timestamp: Math.floor(Date.now() / 1000), // seconds since the epoch (AMQP's timestamp)
    appId: APP_ID,
    headers: { ...headers, ...signer.headers(body, type) },
  };
  if (replyTo) options.replyTo = replyTo;
  if (expirationMs !== undefined) options.expiration = String(Math.max(0, expirationMs));
  return options;
}

/** §4 "Ids": 1..max UTF-8 bytes, no control characters, no lone surrogates. */
function usableId(value, maxBytes, { allowEmpty = false } = {}) {
  return (
    typeof value === "string" &&
    (allowEmpty || value.length > 0) &&
    wellFormed(value) &&
    Buffer.byteLength(value, "utf8") <= maxBytes &&
    !/[\u0000-\u001f\u007f-\u009f]/.test(value)
  );
}

// -- small things both sides need ------------------------------------------------------------

/** Publish on a confirm channel and wait for the broker's ack; rejects on a nack. */
function publishConfirmed(channel, exchange, routingKey, body, options) {
  return new Promise((resolve, reject) => {
    channel.publish(exchange, routingKey, body, options, (error) =>
      error ? reject(new Error(`not confirmed: ${exchange} ${routingKey}`)) : resolve(),
    );
  });
}

/** Tracks basic.return on a channel (mandatory publishes), so a caller can ask after the
 * confirm whether its message came back: the broker sends basic.return before basic.ack. */
class Returns {
  constructor(channel) {
    this.returned = new Set();
    channel.on("return", (message) => {
      const { exchange, routingKey } = message.fields;
      this.returned.add(`${exchange}|${routingKey}|${message.properties.messageId}`);
    });
  }

  /** Whether the message went unrouted (and forget it). */
  take(exchange, routingKey, messageId) {
    return this.returned.delete(`${exchange}|${routingKey}|${messageId}`);
  }
}

/** Parse `--name value` and `--flag` arguments into an object. */
function parseArgs(argv, { flags = [], usage }) {
  const options = {};
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith("--")) throw new Error(`unexpected argument ${arg}\n${usage}`);
    const name = arg.slice(2);
    if (flags.includes(name)) options[name] = true;
    else if (i + 1 < argv.length) options[name] = argv[++i];
    else throw new Error(`${arg} needs a value\n${usage}`);
  }
  return options;
}

const nowMs = () => Date.now();

module.exports = {
  EXCHANGES,
  TYPES,
  HEADERS,
  ERROR_CODES,
  SECURITY_CODES,
  ATTEMPT_HEADERS,
  BIN_KEY,
  WireError,
  encode,
  decode,
  jsonView,
  MsgpackFloat,
  loadValidators,
  schemaErrors,
  signingInput,
  keyIdOf,
  KeyScope,
  parseScope,
  scopePath,
  validPattern,
  Signer,
  KeyRing,
  checkResult,
  checkExecutorEvent,
  checkTask,
  headerString,
  properties,
  usableId,
  publishConfirmed,
  Returns,
  parseArgs,
  nowMs,
};
