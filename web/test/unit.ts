// Unit tests of the web client's pure modules, with Node's test runner:
//   node scripts/run-ts.mjs test/unit.ts
// (run by `cargo test -p conclave-e2ee --test web_interop` too).

import { test } from "node:test";
import assert from "node:assert/strict";
import { parseCommand, MAX_HISTORY_COUNT } from "../src/commands.js";
import { decodePayload, encodePayload, type Payload } from "../src/payload.js";
import { readVarint, writeVarint, fromHex, toHex } from "../src/bytes.js";
import { open, seal, SEAL_CHUNK } from "../src/files.js";
import { describe, describeAct, applyShown, type Actable, ACT_DELETE, ACT_EDIT, ACT_REACT, CT_ACTION, CT_DELETE, CT_MARKDOWN, MAX_EMOJI_BYTES } from "../src/acts.js";
import { markdownTree, mdText, safeHref, MAX_MARKDOWN_CHARS, type MdNode } from "../src/markdown.js";
import type { Message } from "../src/protocol.js";
import { chunkAad, chunkSigned, chunksOf, decodeChunk, decodeSealed, encodeChunk, encodeSealed, MAX_CHUNK_ROWS, type Row } from "../src/transfer.js";
import { matchesQuery, mentionIn, outsideCode, queryWords } from "../src/attention.js";

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

test("end-to-end acts: Payload::Act round-trips and must match its cleartext reference", () => {
  const act: Payload = { kind: "act", msgId: "0193-m1", act: ACT_EDIT, contentType: "text/plain", data: new TextEncoder().encode("fixed") };
  const b = encodePayload(act);
  assert.equal(b[0], 4);
  assert.deepEqual(decodePayload(b), act);
  assert.equal(decodePayload(b.subarray(0, b.length - 1)), undefined);
  assert.equal(decodePayload(new Uint8Array([...b, 0])), undefined);
  const p = { msgId: "m1", act: ACT_EDIT, contentType: "text/plain", data: new TextEncoder().encode("fixed") };
  assert.deepEqual(describeAct(p, { msg_id: "m1", kind: "Edit" }, "bob"), { kind: "edit", target: "m1", text: "fixed" });
  // The server cannot point an act at another message or change its kind.
  assert.equal(describeAct(p, { msg_id: "m2", kind: "Edit" }, "bob"), undefined);
  assert.equal(describeAct(p, { msg_id: "m1", kind: "Delete" }, "bob"), undefined);
  assert.equal(describeAct(p, null, "bob"), undefined);
  const react = { msgId: "m1", act: ACT_REACT, contentType: "text/plain", data: new TextEncoder().encode("👍") };
  assert.deepEqual(describeAct(react, { msg_id: "m1", kind: "React" }, "bob"), { kind: "reaction", target: "m1", emoji: "👍", on: true });
  const huge = { ...react, data: new Uint8Array(MAX_EMOJI_BYTES + 1).fill(65) };
  assert.equal(describeAct(huge, { msg_id: "m1", kind: "React" }, "bob"), undefined);
  assert.deepEqual(describeAct({ msgId: "m1", act: ACT_DELETE, contentType: CT_DELETE, data: new Uint8Array() }, { msg_id: "m1", kind: "Delete" }, "bob"), { kind: "delete", target: "m1" });
  assert.equal(describeAct({ ...p, act: 9 }, { msg_id: "m1", kind: "Edit" }, "bob"), undefined);
});

test("acts change a line: edits by the author only, deletes drop the text, reactions count who", () => {
  const line: Actable = { text: "helo", from: "alice" };
  const edited = applyShown(line, { kind: "edit", target: "m1", text: "hello" }, "alice");
  assert.deepEqual([edited.text, edited.edited], ["hello", true]);
  assert.notEqual(edited, line);
  assert.equal(applyShown(line, { kind: "edit", target: "m1", text: "pwned" }, "mallory").text, "helo");
  let r = applyShown(edited, { kind: "reaction", target: "m1", emoji: "👍", on: true }, "bob");
  r = applyShown(r, { kind: "reaction", target: "m1", emoji: "👍", on: true }, "carol");
  r = applyShown(r, { kind: "reaction", target: "m1", emoji: "👍", on: true }, "bob");
  assert.deepEqual(r.reactions, { "👍": ["carol", "bob"] });
  r = applyShown(r, { kind: "reaction", target: "m1", emoji: "👍", on: false }, "carol");
  r = applyShown(r, { kind: "reaction", target: "m1", emoji: "👍", on: false }, "bob");
  assert.deepEqual(r.reactions, {});
  const d = applyShown(edited, { kind: "delete", target: "m1" }, "carol");
  assert.deepEqual([d.text, d.deleted], ["(deleted)", true]);
  assert.equal(applyShown(d, { kind: "edit", target: "m1", text: "back" }, "alice").text, "(deleted)");
});

test("everyday-chat commands parse as the terminal client's", () => {
  assert.deepEqual(parseCommand("/me waves"), { cmd: "me", text: "waves" });
  assert.deepEqual(parseCommand("/md **yes**"), { cmd: "md", text: "**yes**" });
  assert.deepEqual(parseCommand("/reply agreed"), { cmd: "reply", text: "agreed" });
  assert.deepEqual(parseCommand("/edit fixed text"), { cmd: "edit", text: "fixed text" });
  assert.deepEqual(parseCommand("/delete"), { cmd: "delete" });
  assert.deepEqual(parseCommand("/react 👍"), { cmd: "react", emoji: "👍", on: true });
  assert.deepEqual(parseCommand("/unreact 👍"), { cmd: "react", emoji: "👍", on: false });
  assert.equal(parseCommand("/react").cmd, "error");
  assert.equal(parseCommand(`/react ${"x".repeat(33)}`).cmd, "error");
  assert.deepEqual(parseCommand("/topic deploy at five"), { cmd: "topic", topic: "deploy at five" });
  assert.deepEqual(parseCommand("/away lunch"), { cmd: "away", text: "lunch" });
  assert.deepEqual(parseCommand("/away"), { cmd: "away", text: undefined });
  assert.deepEqual(parseCommand("/back"), { cmd: "back" });
  assert.deepEqual(parseCommand("/ban mallory spam"), { cmd: "ban", user: "mallory", reason: "spam" });
  assert.deepEqual(parseCommand("/unban mallory"), { cmd: "unban", user: "mallory" });
  assert.deepEqual(parseCommand("/announce maintenance at 6"), { cmd: "announce", text: "maintenance at 6" });
  assert.equal(parseCommand("/edit").cmd, "error");
  assert.equal(parseCommand("/announce").cmd, "error");
});

test("Markdown (markdown-it tokens): a tree of known elements; HTML stays text and only http(s)/mailto links are links", () => {
  assert.deepEqual(markdownTree("a **loud** and *soft* `a*b*`"), [
    { tag: "p", children: ["a ", { tag: "strong", children: ["loud"] }, " and ", { tag: "em", children: ["soft"] }, " ", { tag: "code", children: ["a*b*"] }] },
  ]);
  const tags = (ns: MdNode[]): string[] => ns.flatMap((n) => (typeof n === "string" ? [] : [n.tag, ...tags(n.children)]));
  // Script and HTML are text: nothing here is ever parsed as HTML.
  const html = markdownTree("<script>alert(1)</script><img src=x onerror=alert(1)>");
  assert.deepEqual(tags(html), ["p"], JSON.stringify(html));
  assert.equal(mdText(html), "<script>alert(1)</script><img src=x onerror=alert(1)>");
  // A link shows its address after its text.
  assert.deepEqual(markdownTree("[docs](https://example.org/a)"), [
    { tag: "p", children: [{ tag: "a", href: "https://example.org/a", children: ["docs"] }, " <https://example.org/a>"] },
  ]);
  assert.ok(tags(markdownTree("[mail](mailto:a@example.org)")).includes("a"));
  for (const bad of ["javascript:alert(1)", "JavaScript:alert(1)", "data:text/html,<script>x</script>", "vbscript:x", "//evil.example"]) {
    const out = markdownTree(`[click](${bad})`);
    assert.ok(!tags(out).includes("a"), `${bad} must not become a link: ${JSON.stringify(out)}`);
    assert.equal(safeHref(bad), false);
  }
  assert.equal(safeHref("https://a b"), false);
  assert.deepEqual(markdownTree("> quoted\n\n```\n<b>x</b>\n```\n\nafter"), [
    { tag: "blockquote", children: [{ tag: "p", children: ["quoted"] }] },
    { tag: "pre", children: [{ tag: "code", children: ["<b>x</b>"] }] },
    { tag: "p", children: ["after"] },
  ]);
  assert.equal(mdText(markdownTree("a * b * c")), "a * b * c");
  assert.equal(mdText(markdownTree("\\*not\\*")), "*not*");
  // A deep pile of markup stays finite; an overlong message is plain text.
  const deep = "**".repeat(2000) + "x" + "**".repeat(2000);
  assert.ok(markdownTree(deep).length > 0);
  assert.deepEqual(markdownTree("*".repeat(MAX_MARKDOWN_CHARS + 1)), ["*".repeat(MAX_MARKDOWN_CHARS + 1)]);
});


test("mentions are whole names; @room counts only from the room's owner (as the native client)", () => {
  assert.equal(mentionIn("hi @bob", "bob", false), "me");
  assert.equal(mentionIn("hi @Bob.", "bob", false), "me");
  assert.equal(mentionIn("hi @bobby", "bob", false), undefined);
  assert.equal(mentionIn("mail bob@bob.org", "bob", false), undefined);
  assert.equal(mentionIn("all: @room", "bob", true), "room");
  assert.equal(mentionIn("all: @room", "bob", false), undefined);
  assert.equal(mentionIn("@room and @bob", "bob", true), "me");
  assert.equal(mentionIn(outsideCode("run `@bob --help` first"), "bob", false), undefined);
  assert.equal(mentionIn(outsideCode("```\n@bob\n```\nnot here"), "bob", false), undefined);
  assert.equal(mentionIn(outsideCode("`x` then @bob"), "bob", false), "me");
});

test("local search holds every word, ignoring case and accents", () => {
  const w = queryWords("  Café   DEPLOY ");
  assert.deepEqual(w, ["cafe", "deploy"]);
  assert.equal(matchesQuery("the deploy is at the café", w), true);
  assert.equal(matchesQuery("the deploy is at noon", w), false);
  assert.equal(matchesQuery("anything", []), false);
});

test("the thread, display name and read-receipt commands parse", () => {
  assert.deepEqual(parseCommand("/thread"), { cmd: "thread" });
  assert.deepEqual(parseCommand("/name Alice A."), { cmd: "name", name: "Alice A." });
  assert.deepEqual(parseCommand("/name"), { cmd: "name", name: undefined });
  assert.deepEqual(parseCommand("/receipts off"), { cmd: "receipts", on: false });
  assert.deepEqual(parseCommand("/receipts ON"), { cmd: "receipts", on: true });
  assert.equal(parseCommand("/receipts maybe").cmd, "error");
  assert.deepEqual(parseCommand("/mute"), { cmd: "mute", on: true });
  assert.deepEqual(parseCommand("/UNMUTE"), { cmd: "mute", on: false });
});

test("history chunks for a new device are postcard as the native Chunk, bound and bounded", () => {
  // Vec<Row> of one row, then last, replaces, conversations, messages.
  const row: Row = {
    conv: "r:a",
    seq: 3,
    sender: "b",
    tsMs: 64,
    payload: new Uint8Array([9]),
    state: { msgId: "m", state: { replyTo: undefined, editedMs: undefined, edits: 0, deleted: false, reactions: [["x", ["b"]]] } },
  };
  assert.deepEqual(
    Array.from(encodeChunk({ rows: [row], last: true, replaces: false, conversations: 1, messages: 1 })),
    [1, 3, 0x72, 0x3a, 0x61, 3, 1, 0x62, 128, 1, 1, 9, 1, 1, 0x6d, 0, 0, 0, 0, 1, 1, 0x78, 1, 1, 0x62, 1, 0, 1, 1],
  );
  assert.equal(new TextDecoder().decode(chunkAad("alice", "d1", "d2", "t", 4)), "alice|d1|d2|t|4");
  const signed = chunkSigned(new Uint8Array([1]), new Uint8Array([2, 2]), new Uint8Array(0));
  assert.deepEqual(Array.from(signed.subarray(signed.length - 27)), [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0]);
  const many = Array.from({ length: MAX_CHUNK_ROWS * 2 + 1 }, (_, i) => ({ ...row, seq: i + 1 }));
  assert.deepEqual(chunksOf(many).map((c) => c.length), [MAX_CHUNK_ROWS, MAX_CHUNK_ROWS, 1]);
});

test("history chunks sent to this browser decode as they encode, and refuse what is malformed", () => {
  const rows: Row[] = [
    { conv: "d:a,b", seq: 7, sender: "a", tsMs: -5, payload: new Uint8Array([1, 2]), state: undefined },
    {
      conv: "r:lab",
      seq: 2 ** 40,
      sender: "b",
      tsMs: 1_765_000_000_000,
      payload: new Uint8Array(0),
      state: { msgId: "m1", state: { replyTo: "m0", editedMs: 12, edits: 2, deleted: true, reactions: [["👍", ["a", "b"]]] } },
    },
  ];
  const chunk = { rows, last: false, replaces: true, conversations: 2, messages: 9 };
  const b = encodeChunk(chunk);
  assert.deepEqual(decodeChunk(b), chunk);
  assert.throws(() => decodeChunk(b.subarray(0, b.length - 1)));
  assert.throws(() => decodeChunk(new Uint8Array([...b, 0])));
  // A list longer than its bytes can hold ends at the bytes.
  assert.throws(() => decodeChunk(new Uint8Array([0xff, 0xff, 0xff, 0x0f])));
  const sealed = { kemOutput: new Uint8Array([1]), ciphertext: new Uint8Array([2, 3]), signerKey: new Uint8Array(32).fill(4), signature: new Uint8Array(64).fill(5) };
  assert.deepEqual(decodeSealed(encodeSealed(sealed)), sealed);
});
