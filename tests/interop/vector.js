#!/usr/bin/env node
// Check docs/wire-format.md §8 (the test vector) with this directory's implementation: the
// task's msgpack body byte for byte, the signed header line, the key id and the signature
// (over the header line and the body, §5), and that the signature verifies for a task and for
// no other type. Exits 0 when all match.
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const path = require("node:path");
const w = require("./lib/wire");

const DOC = fs.readFileSync(path.resolve(__dirname, "..", "..", "docs", "wire-format.md"), "utf8");

function block(tag) {
  const match = DOC.match(new RegExp(`\`\`\`${tag}\\n([\\s\\S]*?)\`\`\``));
  if (!match) throw new Error(`docs/wire-format.md has no \`\`\`${tag} block`);
  return match[1];
}

// An Ed25519 private key from its 32-byte seed: PKCS#8 DER is a fixed prefix and the seed.
const PKCS8_ED25519_PREFIX = Buffer.from("302e020100300506032b657004220420", "hex");
const seed = DOC.match(/TEST 1\):\s*`([0-9a-f]{64})`, whose public key is\s*`([0-9a-f]{64})`/);
const signer = new w.Signer(
  crypto.createPrivateKey({
    key: Buffer.concat([PKCS8_ED25519_PREFIX, Buffer.from(seed[1], "hex")]),
    format: "der",
    type: "pkcs8",
  }),
);

const failures = [];
const raw = Buffer.from(signer.publicKey.export({ format: "jwk" }).x, "base64url");
if (raw.toString("hex") !== seed[2]) failures.push("the public key is not the doc's");

const body = w.encode(JSON.parse(block("json test-vector-task")));
const expected = Buffer.from(block("text test-vector-body").replace(/\s/g, ""), "hex");
if (!body.equals(expected))
  failures.push(`body differs:\n  ours ${body.toString("hex")}\n  doc  ${expected.toString("hex")}`);

const docHeaders = Object.fromEntries(
  block("text test-vector-headers")
    .trim()
    .split("\n")
    .map((line) => line.split(": ")),
);
const headers = signer.headers(expected, w.TYPES.task);
for (const [name, value] of Object.entries(docHeaders)) {
  if (headers[name] !== value) failures.push(`${name}: ours ${headers[name]}, doc ${value}`);
}

// "The bytes signed are the line `...`, a line feed, then those 218 bytes."
const line = DOC.match(/The bytes signed are the line `([^`]+)`, a line feed/);
if (!line) failures.push("the doc names no signed header line");
const signed = w.signingInput(w.TYPES.task, signer.keyId, expected);
if (line && !signed.equals(Buffer.concat([Buffer.from(`${line[1]}\n`, "ascii"), expected])))
  failures.push(`signed bytes: ours start ${JSON.stringify(signed.subarray(0, 60).toString())}`);
const hex = DOC.match(/The signature in hex: `([0-9a-f]+)\s*([0-9a-f]+)`/);
const docSignature = hex ? Buffer.from(hex[1] + hex[2], "hex") : null;
if (!docSignature || !docSignature.equals(Buffer.from(headers[w.HEADERS.signature], "base64")))
  failures.push("the signature in hex is not the header's");
// a receiver that expects a task verifies it; one expecting any other type does not (§5)
const verifies = (type) =>
  crypto.verify(null, w.signingInput(type, signer.keyId, expected), signer.publicKey,
    Buffer.from(docHeaders[w.HEADERS.signature] ?? "", "base64"));
if (!verifies(w.TYPES.task)) failures.push("the doc's signature does not verify as a task");
if (verifies(w.TYPES.result)) failures.push("the doc's signature verifies as a result");

failures.push(...w.schemaErrors(w.loadValidators(), w.TYPES.task, w.decode(expected)));

if (failures.length) {
  process.stderr.write(`${failures.join("\n")}\n`);
  process.exit(1);
}
process.stdout.write("test vector: body, signed header, key id and signature match\n");
