// History between devices of the same account, as the native devices move it
// (crates/conclave-e2ee/src/transfer.rs, crates/conclave-client/src/devices.rs): the rows of
// this browser's end-to-end history in chunks, each chunk (postcard) sealed with HPKE to the
// new device's transfer key (whose signature by that device is checked first) and signed by
// the sending device; and the other way, the chunks a native device sends this browser when
// it is the new one. Encoding only here (no I/O), so the unit tests pin it.

import { concat, readBytes, readFixed, readVarint, writeBytes, writeVarint } from "./bytes.js";

const enc = new TextEncoder();

export const TRANSFER_INFO = enc.encode("conclave-history-transfer-v1");
export const TRANSFER_KEY_LABEL = enc.encode("conclave-transfer-key-v1|");
export const CHUNK_LABEL = enc.encode("conclave-transfer-chunk-v1|");
/** Most rows in one chunk, and about the most payload bytes (a row is never split). The
 * native bounds are 500 rows and 256 KiB; smaller chunks keep each request well under the
 * server's frame size. */
export const MAX_CHUNK_ROWS = 200;
export const MAX_CHUNK_BYTES = 96 * 1024;

/** A message's state as the native history keeps it (`LocalState`). */
export interface LocalState {
  replyTo: string | undefined;
  editedMs: number | undefined;
  edits: number;
  deleted: boolean;
  /** Each emoji with who reacted, in the order they first did. */
  reactions: [string, string[]][];
}

/** One row of the local history, as it travels (`Row`). */
export interface Row {
  conv: string;
  seq: number;
  sender: string;
  tsMs: number;
  /** The payload's encoding (`Payload::encode`). */
  payload: Uint8Array;
  state: { msgId: string; state: LocalState } | undefined;
}

export interface Chunk {
  rows: Row[];
  last: boolean;
  replaces: boolean;
  conversations: number;
  messages: number;
}

const str = (s: string) => writeBytes(enc.encode(s));
const bool = (b: boolean) => new Uint8Array([b ? 1 : 0]);
/** postcard's i64: zigzag, then a varint. */
function i64(n: number): Uint8Array {
  if (!Number.isSafeInteger(n)) throw new Error("integer out of range");
  return writeVarint(n >= 0 ? 2 * n : -2 * n - 1);
}
function option<T>(v: T | undefined, f: (v: T) => Uint8Array): Uint8Array {
  return v === undefined ? new Uint8Array([0]) : concat([new Uint8Array([1]), f(v)]);
}
function vec<T>(items: T[], f: (v: T) => Uint8Array): Uint8Array {
  return concat([writeVarint(items.length), ...items.map(f)]);
}

function encodeState(s: LocalState): Uint8Array {
  return concat([
    option(s.replyTo, str),
    option(s.editedMs, i64),
    writeVarint(s.edits),
    bool(s.deleted),
    vec(s.reactions, ([emoji, who]) => concat([str(emoji), vec(who, str)])),
  ]);
}

function encodeRow(r: Row): Uint8Array {
  return concat([
    str(r.conv),
    writeVarint(r.seq),
    str(r.sender),
    i64(r.tsMs),
    writeBytes(r.payload),
    option(r.state, (st) => concat([str(st.msgId), encodeState(st.state)])),
  ]);
}

/** A chunk in postcard's encoding (the native `Chunk`). */
export function encodeChunk(c: Chunk): Uint8Array {
  return concat([vec(c.rows, encodeRow), bool(c.last), bool(c.replaces), writeVarint(c.conversations), writeVarint(c.messages)]);
}

/** What a chunk is bound to: the account, the two devices, the transfer and the position. */
export function chunkAad(user: string, fromDevice: string, toDevice: string, transfer: string, index: number): Uint8Array {
  return enc.encode(`${user}|${fromDevice}|${toDevice}|${transfer}|${index}`);
}

function be64(n: number): Uint8Array {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt(n));
  return out;
}

/** What the approver signs of a sealed chunk. */
export function chunkSigned(aad: Uint8Array, kemOutput: Uint8Array, ciphertext: Uint8Array): Uint8Array {
  const parts: Uint8Array[] = [CHUNK_LABEL];
  for (const p of [aad, kemOutput, ciphertext]) parts.push(be64(p.length), p);
  return concat(parts);
}

/** The sealed chunk as it is stored for the new device (the native `Sealed`). */
export function encodeSealed(s: { kemOutput: Uint8Array; ciphertext: Uint8Array; signerKey: Uint8Array; signature: Uint8Array }): Uint8Array {
  return concat([writeBytes(s.kemOutput), writeBytes(s.ciphertext), writeBytes(s.signerKey), writeBytes(s.signature)]);
}

/** Rows split into chunks of at most MAX_CHUNK_ROWS rows and about MAX_CHUNK_BYTES. */
export function chunksOf(rows: Row[]): Row[][] {
  const out: Row[][] = [];
  let cur: Row[] = [];
  let bytes = 0;
  for (const r of rows) {
    cur.push(r);
    bytes += r.payload.length + r.conv.length + 32;
    if (cur.length >= MAX_CHUNK_ROWS || bytes >= MAX_CHUNK_BYTES) {
      out.push(cur);
      cur = [];
      bytes = 0;
    }
  }
  if (cur.length > 0) out.push(cur);
  return out;
}

// --- decoding (chunks sent to this browser) ----------------------------------------------------

/** Most rows, reactions and reacting users read from one chunk (bounds on peer data). */
export const MAX_DECODED_ROWS = 100_000;
export const MAX_DECODED_LIST = 10_000;

const dec = new TextDecoder("utf-8", { fatal: true });

class Reader {
  r = { at: 0 };
  constructor(private b: Uint8Array) {}
  end(): boolean {
    return this.r.at === this.b.length;
  }
  varint(): number {
    const n = readVarint(this.b, this.r);
    if (n === undefined) throw new Error("a history chunk is cut short");
    return n;
  }
  bytes(): Uint8Array {
    const v = readBytes(this.b, this.r);
    if (v === undefined) throw new Error("a history chunk is cut short");
    return v;
  }
  str(): string {
    return dec.decode(this.bytes());
  }
  bool(): boolean {
    const v = readFixed(this.b, this.r, 1)?.[0];
    if (v !== 0 && v !== 1) throw new Error("a history chunk has a bad flag");
    return v === 1;
  }
  i64(): number {
    const z = this.varint();
    return z % 2 === 0 ? z / 2 : -(z + 1) / 2;
  }
  option<T>(f: () => T): T | undefined {
    return this.bool() ? f() : undefined;
  }
  vec<T>(f: () => T, max: number): T[] {
    const n = this.varint();
    if (n > max) throw new Error("a history chunk lists too much");
    const out: T[] = [];
    for (let i = 0; i < n; i++) out.push(f());
    return out;
  }
}

/** A chunk from its postcard encoding; throws on anything malformed. */
export function decodeChunk(b: Uint8Array): Chunk {
  const r = new Reader(b);
  const rows = r.vec((): Row => {
    const conv = r.str();
    const seq = r.varint();
    const sender = r.str();
    const tsMs = r.i64();
    const payload = r.bytes();
    const state = r.option(() => {
      const msgId = r.str();
      const st: LocalState = {
        replyTo: r.option(() => r.str()),
        editedMs: r.option(() => r.i64()),
        edits: r.varint(),
        deleted: r.bool(),
        reactions: r.vec((): [string, string[]] => [r.str(), r.vec(() => r.str(), MAX_DECODED_LIST)], MAX_DECODED_LIST),
      };
      return { msgId, state: st };
    });
    return { conv, seq, sender, tsMs, payload, state };
  }, MAX_DECODED_ROWS);
  const c: Chunk = { rows, last: r.bool(), replaces: r.bool(), conversations: r.varint(), messages: r.varint() };
  if (!r.end()) throw new Error("a history chunk has trailing bytes");
  return c;
}

/** A sealed chunk from its postcard encoding. */
export function decodeSealed(b: Uint8Array): { kemOutput: Uint8Array; ciphertext: Uint8Array; signerKey: Uint8Array; signature: Uint8Array } {
  const r = new Reader(b);
  const out = { kemOutput: r.bytes(), ciphertext: r.bytes(), signerKey: r.bytes(), signature: r.bytes() };
  if (!r.end()) throw new Error("a sealed history chunk has trailing bytes");
  return out;
}
