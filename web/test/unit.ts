// Unit tests of the web client's pure modules, with Node's test runner:
//   node scripts/run-ts.mjs test/unit.ts
// (run by `cargo test -p conclave-e2ee --test web_interop` too).

import { test } from "node:test";
import assert from "node:assert/strict";
import { parseCommand, MAX_HISTORY_COUNT } from "../src/commands.js";
import { decodePayload, encodePayload, type Payload } from "../src/payload.js";
import { readVarint, writeVarint, fromHex, toHex } from "../src/bytes.js";
import { open, seal, SEAL_CHUNK } from "../src/files.js";
import { describe, CT_ACTION, CT_DELETE, CT_MARKDOWN } from "../src/acts.js";
import type { Message } from "../src/protocol.js";

test("slash commands parse as the terminal client's", () => {
  assert.deepEqual(parseCommand("hello"), { cmd: "say", text: "hello" });
  assert.deepEqual(parseCommand("//not a command"), { cmd: "say", text: "/not a command" });
  assert.deepEqual(parseCommand("/join lab"), { cmd: "join", room: "lab", password: undefined });
  assert.deepEqual(parseCommand("/join #lab sesame"), { cmd: "join", room: "lab", password: "sesame" });
  assert.deepEqual(parseCommand("/msg bob hi there"), { cmd: "msg", to: ["bob"], text: "hi there" });
  assert.deepEqual(parseCommand("/msg bob,carol hi"), { cmd: "msg", to: ["bob", "carol"], text: "hi" });
  assert.deepEqual(parseCommand("/create ops private server pw"), { cmd: "create", room: "ops", private: true, server: true, password: "pw" });
  assert.deepEqual(parseCommand("/history 9999"), { cmd: "history", count: MAX_HISTORY_COUNT });
  assert.equal(parseCommand("/msg bob").cmd, "error");
  assert.equal(parseCommand("/history -3").cmd, "error");
  assert.equal(parseCommand("/nonsense").cmd, "error");
  assert.deepEqual(parseCommand("/kick mallory spamming a lot"), { cmd: "kick", user: "mallory", reason: "spamming a lot" });
});

test("payloads round-trip and refuse trailing or short bytes", () => {
  const all: Payload[] = [
    { kind: "body", contentType: "text/plain", data: new TextEncoder().encode("héllo") },
    { kind: "file", fileId: "0193-abc", name: "notes.txt", size: 300_000, sha256: new Uint8Array(32).fill(7), key: new Uint8Array(32).fill(9) },
    { kind: "sealed_key", id: new Uint8Array(16).fill(1), key: new Uint8Array(32).fill(2) },
    { kind: "sealed", id: new Uint8Array(16).fill(3), nonce: new Uint8Array(24).fill(4), ciphertext: new Uint8Array(500).fill(5) },
  ];
  for (const p of all) {
    const b = encodePayload(p);
    assert.deepEqual(decodePayload(b), p);
    assert.equal(decodePayload(new Uint8Array([...b, 0])), undefined);
    assert.equal(decodePayload(b.subarray(0, b.length - 1)), undefined);
  }
  assert.equal(decodePayload(new Uint8Array([9])), undefined);
  // postcard: variant 0, "text/plain", [104, 105]
  assert.equal(toHex(encodePayload({ kind: "body", contentType: "text/plain", data: new Uint8Array([104, 105]) })), "000a746578742f706c61696e026869");
});

test("varints and hex", () => {
  for (const n of [0, 1, 127, 128, 300, 2 ** 32, Number.MAX_SAFE_INTEGER]) {
    assert.equal(readVarint(writeVarint(n), { at: 0 }), n);
  }
  assert.equal(readVarint(new Uint8Array([0x80]), { at: 0 }), undefined);
  assert.equal(fromHex("zz"), undefined);
  assert.equal(fromHex("abc"), undefined);
});

test("sealed files open, and any change is refused", () => {
  for (const size of [0, 1, SEAL_CHUNK - 1, SEAL_CHUNK, SEAL_CHUNK + 1, 3 * SEAL_CHUNK + 5]) {
    const plain = new Uint8Array(size).map((_, i) => i % 251);
    const { key, sealed } = seal(plain);
    assert.deepEqual(open(key, sealed), plain);
    if (sealed.length > 40) {
      const bad = sealed.slice();
      bad[30] = (bad[30] ?? 0) ^ 1;
      assert.throws(() => open(key, bad));
    }
    // Truncated by one whole chunk: the last-chunk flag no longer matches.
    if (size > SEAL_CHUNK) assert.throws(() => open(key, sealed.subarray(0, 19 + SEAL_CHUNK + 16)));
  }
});

test("edits, deletes, reactions, /me and Markdown of server-encrypted conversations", () => {
  const msg = (content_type: string, text: string, extra: Message["extra"] = null): Message => ({
    msg_id: "m2", conv: { Room: "lab" }, from: "bob", seq: 2, ts_ms: 0,
    body: { content_type, data: [...new TextEncoder().encode(text)] }, extra,
  });
  const on = (kind: "Edit" | "Delete" | "React" | "Unreact") => ({ reply_to: null, acts_on: { msg_id: "m1", kind }, state: null });
  assert.deepEqual(describe(msg("text/plain", "hi")), { kind: "line", text: "hi" });
  assert.deepEqual(describe(msg(CT_ACTION, "waves")), { kind: "line", text: "* bob waves" });
  assert.deepEqual(describe(msg(CT_MARKDOWN, "**yes**")), { kind: "line", text: "**yes**" });
  assert.deepEqual(describe(msg("text/plain", "fixed", on("Edit"))), { kind: "edit", target: "m1", text: "fixed" });
  assert.deepEqual(describe(msg(CT_DELETE, "", on("Delete"))), { kind: "delete", target: "m1" });
  assert.deepEqual(describe(msg("text/plain", "👍", on("React"))), { kind: "reaction", target: "m1", emoji: "👍", on: true });
  const state = (deleted: boolean, edited_ms: number | null) => ({ reply_to: null, acts_on: null, state: { edited_ms, edits: edited_ms === null ? 0 : 1, deleted, reactions: [] } });
  assert.deepEqual(describe(msg("text/plain", "", state(true, null))), { kind: "line", text: "(deleted)" });
  assert.deepEqual(describe(msg("text/plain", "new", state(false, 5))), { kind: "line", text: "new (edited)" });
  assert.deepEqual(describe(msg("application/x-other", "abc")), { kind: "line", text: "[application/x-other, 3 bytes]" });
});
