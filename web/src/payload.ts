// conclave-e2ee's Payload (crates/conclave-e2ee/src/payload.rs) in postcard's encoding: what an
// MLS application message carries. The variant order is the Rust enum's.

import { concat, readBytes, readFixed, readVarint, writeBytes, writeVarint } from "./bytes.js";

const enc = new TextEncoder();
const dec = new TextDecoder("utf-8", { fatal: true });

export type Payload =
  | { kind: "body"; contentType: string; data: Uint8Array }
  | { kind: "file"; fileId: string; name: string; size: number; sha256: Uint8Array; key: Uint8Array }
  | { kind: "sealed_key"; id: Uint8Array; key: Uint8Array }
  | { kind: "sealed"; id: Uint8Array; nonce: Uint8Array; ciphertext: Uint8Array }
  /** An edit, delete or reaction of the message `msgId` (kind: 1 edit, 2 delete, 3 react,
   * 4 unreact; `u8` in postcard is one byte). */
  | { kind: "act"; msgId: string; act: number; contentType: string; data: Uint8Array };

const str = (s: string) => writeBytes(enc.encode(s));

function fixed(b: Uint8Array, len: number): Uint8Array {
  if (b.length !== len) throw new Error(`expected ${len} bytes, got ${b.length}`);
  return b;
}

export function encodePayload(p: Payload): Uint8Array {
  switch (p.kind) {
    case "body":
      return concat([writeVarint(0), str(p.contentType), writeBytes(p.data)]);
    case "file":
      return concat([writeVarint(1), str(p.fileId), str(p.name), writeVarint(p.size), fixed(p.sha256, 32), fixed(p.key, 32)]);
    case "sealed_key":
      return concat([writeVarint(2), fixed(p.id, 16), fixed(p.key, 32)]);
    case "sealed":
      return concat([writeVarint(3), fixed(p.id, 16), fixed(p.nonce, 24), writeBytes(p.ciphertext)]);
    case "act":
      if (!Number.isInteger(p.act) || p.act < 0 || p.act > 255) throw new Error(`an act's kind is one byte, not ${p.act}`);
      return concat([writeVarint(4), str(p.msgId), new Uint8Array([p.act]), str(p.contentType), writeBytes(p.data)]);
  }
}

function readStr(b: Uint8Array, r: { at: number }): string | undefined {
  const s = readBytes(b, r);
  if (s === undefined) return undefined;
  try {
    return dec.decode(s);
  } catch {
    return undefined;
  }
}

export function decodePayload(b: Uint8Array): Payload | undefined {
  const r = { at: 0 };
  const tag = readVarint(b, r);
  let p: Payload | undefined;
  if (tag === 0) {
    const contentType = readStr(b, r);
    const data = readBytes(b, r);
    if (contentType !== undefined && data !== undefined) p = { kind: "body", contentType, data };
  } else if (tag === 1) {
    const fileId = readStr(b, r);
    const name = readStr(b, r);
    const size = readVarint(b, r);
    const sha256 = readFixed(b, r, 32);
    const key = readFixed(b, r, 32);
    if (fileId !== undefined && name !== undefined && size !== undefined && sha256 && key) {
      p = { kind: "file", fileId, name, size, sha256, key };
    }
  } else if (tag === 2) {
    const id = readFixed(b, r, 16);
    const key = readFixed(b, r, 32);
    if (id && key) p = { kind: "sealed_key", id, key };
  } else if (tag === 3) {
    const id = readFixed(b, r, 16);
    const nonce = readFixed(b, r, 24);
    const ciphertext = readBytes(b, r);
    if (id && nonce && ciphertext) p = { kind: "sealed", id, nonce, ciphertext };
  } else if (tag === 4) {
    const msgId = readStr(b, r);
    const act = readFixed(b, r, 1);
    const contentType = readStr(b, r);
    const data = readBytes(b, r);
    if (msgId !== undefined && act && contentType !== undefined && data !== undefined) {
      p = { kind: "act", msgId, act: act[0] as number, contentType, data };
    }
  }
  return p !== undefined && r.at === b.length ? p : undefined;
}

export function textPayload(text: string): Uint8Array {
  return encodePayload({ kind: "body", contentType: "text/plain", data: enc.encode(text) });
}
