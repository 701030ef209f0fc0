// Files in and out, relayed through the server. In an end-to-end conversation the file is
// sealed as the native client seals it (conclave-e2ee's file_crypt.rs): a random key,
// XChaCha20-Poly1305 in the STREAM construction (big-endian 32-bit counter, last-chunk flag)
// over 64 KiB chunks, sent under a random name `e2ee-….bin`; its real name, size, SHA-256 and
// key go to the members in an MLS message (Payload::File).

import { xchacha20poly1305 } from "@noble/ciphers/chacha.js";
import { concat, fromHex, toHex } from "./bytes.js";
import { RequestError, bytesIn, bytesOut } from "./protocol.js";
import type { Target } from "./generated/protocol.js";
import type { Session } from "./session.js";

/** Plaintext bytes per sealed chunk (file_crypt.rs's CHUNK). */
export const SEAL_CHUNK = 64 * 1024;
const TAG = 16;
const PREFIX = 19;
/** Largest file the web client sends or saves (it holds the file in memory). */
export const MAX_WEB_FILE_BYTES = 64 * 1024 * 1024;
/** Most chunk requests one transfer makes (a bound on the loops below). */
const MAX_CHUNKS = MAX_WEB_FILE_BYTES / 1024 + 16;
/** Waits for a file whose upload is not complete yet: this many, this long each. */
const MAX_NOT_READY = 120;
const NOT_READY_WAIT_MS = 500;

async function sha256(b: Uint8Array): Promise<Uint8Array> {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", b as BufferSource));
}

function nonce(prefix: Uint8Array, counter: number, last: boolean): Uint8Array {
  const n = new Uint8Array(24);
  n.set(prefix, 0);
  new DataView(n.buffer).setUint32(PREFIX, counter, false);
  n[23] = last ? 1 : 0;
  return n;
}

/** Seals a file under a fresh key: (key, ciphertext). */
export function seal(plain: Uint8Array): { key: Uint8Array; sealed: Uint8Array } {
  const key = crypto.getRandomValues(new Uint8Array(32));
  const prefix = crypto.getRandomValues(new Uint8Array(PREFIX));
  const parts: Uint8Array[] = [prefix];
  const chunks = Math.max(1, Math.ceil(plain.length / SEAL_CHUNK));
  for (let i = 0; i < chunks; i++) {
    const chunk = plain.subarray(i * SEAL_CHUNK, (i + 1) * SEAL_CHUNK);
    parts.push(xchacha20poly1305(key, nonce(prefix, i, i === chunks - 1)).encrypt(chunk));
  }
  return { key, sealed: concat(parts) };
}

/** Opens what `seal` (or the native client) sealed; throws on any tampering. */
export function open(key: Uint8Array, sealed: Uint8Array): Uint8Array {
  if (sealed.length < PREFIX + TAG) throw new Error("the sealed file is truncated");
  const prefix = sealed.subarray(0, PREFIX);
  const body = sealed.subarray(PREFIX);
  const step = SEAL_CHUNK + TAG;
  const chunks = Math.max(1, Math.ceil(body.length / step));
  const parts: Uint8Array[] = [];
  for (let i = 0; i < chunks; i++) {
    const ct = body.subarray(i * step, (i + 1) * step);
    try {
      parts.push(xchacha20poly1305(key, nonce(prefix, i, i === chunks - 1)).decrypt(ct));
    } catch {
      throw new Error("the file does not decrypt under its key (altered or truncated); ask the sender again");
    }
  }
  return concat(parts);
}

async function upload(s: Session, target: Target, name: string, data: Uint8Array, progress: HTMLProgressElement): Promise<string> {
  const [, created] = await s.call({
    FileOffer: { target, name, size: data.length, sha256: bytesOut(await sha256(data)), p2p: null },
  });
  const c = created as { file_id: string; chunk_size: number; uploaded: number };
  const step = Math.max(1, c.chunk_size);
  progress.hidden = false;
  let offset = c.uploaded;
  for (let n = 0; offset < data.length && n < MAX_CHUNKS; n++) {
    const chunk = data.subarray(offset, offset + step);
    const [, up] = await s.call({ FileChunk: { file_id: c.file_id, offset, data: bytesOut(chunk) } });
    offset = (up as { uploaded: number }).uploaded;
    progress.value = offset / Math.max(1, data.length);
  }
  progress.hidden = true;
  return c.file_id;
}

/** Offers a file to the conversation `key` (sealed when it is end-to-end). */
export async function sendFile(s: Session, key: string, file: File, progress: HTMLProgressElement): Promise<void> {
  if (file.size > MAX_WEB_FILE_BYTES) {
    throw new Error(`the web client sends files up to ${MAX_WEB_FILE_BYTES / 1024 / 1024} MiB; use conclave chat for larger ones`);
  }
  const c = s.state.convs.get(key);
  if (c === undefined) throw new Error("no such conversation");
  const target: Target =
    "Room" in c.conv ? { Room: { room: c.conv.Room, except: [] } } : { Users: { to: c.conv.Direct.filter((u) => u !== s.state.user) } };
  const plain = new Uint8Array(await file.arrayBuffer());
  if (!s.isE2ee(key)) {
    await upload(s, target, file.name, plain, progress);
    s.notice(key, `sent the file ${file.name}`);
    return;
  }
  const { key: fileKey, sealed } = seal(plain);
  const wireName = `e2ee-${toHex(crypto.getRandomValues(new Uint8Array(8)))}.bin`;
  const fileId = await upload(s, target, wireName, sealed, progress);
  await s.sendFileDescription(key, { fileId, name: file.name, size: plain.length, sha256: await sha256(plain), key: fileKey });
}

/** Downloads a file offered in the timeline, checks it, and hands it to the browser. */
export async function saveFile(
  s: Session,
  file: { fileId: string; name: string; size: number; sha256: string; key?: string },
  _from: string,
  progress: HTMLProgressElement,
): Promise<void> {
  const parts: Uint8Array[] = [];
  let offset = 0;
  const expected = file.key === undefined ? file.size : PREFIX + file.size + Math.max(1, Math.ceil(file.size / SEAL_CHUNK)) * TAG;
  progress.hidden = false;
  for (let n = 0; n < MAX_CHUNKS && offset < expected; n++) {
    let got: unknown;
    try {
      [, got] = await s.call({ FileFetch: { file_id: file.fileId, offset } });
    } catch (e) {
      // The description can arrive before the upload is complete: wait for it, bounded.
      if (e instanceof RequestError && e.code === "NotReady" && n < MAX_NOT_READY) {
        await new Promise((r) => setTimeout(r, NOT_READY_WAIT_MS));
        continue;
      }
      throw e;
    }
    const d = bytesIn((got as { data: unknown }).data);
    if (d.length === 0) break;
    parts.push(d);
    offset += d.length;
    if (offset > expected) throw new Error("the file is larger than announced");
    progress.value = Math.min(1, offset / Math.max(1, expected));
  }
  progress.hidden = true;
  let data = concat(parts);
  if (file.key !== undefined) {
    const k = fromHex(file.key);
    if (k === undefined) throw new Error("a bad file key");
    data = open(k, data);
  }
  if (data.length !== file.size || toHex(await sha256(data)) !== file.sha256) {
    throw new Error("what arrived does not match the file's size and SHA-256 (discarded); ask the sender again");
  }
  await s.call({ FileReceived: { file_id: file.fileId, via_p2p: false } }).catch(() => undefined);
  const url = URL.createObjectURL(new Blob([data as BlobPart]));
  const a = document.createElement("a");
  a.href = url;
  a.download = file.name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
