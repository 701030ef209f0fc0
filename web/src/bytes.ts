// Small byte helpers: concatenation, hex and base64, and postcard's varint-prefixed byte strings
// (the encoding of conclave-e2ee's Payload).

export function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

export function toHex(b: Uint8Array): string {
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

export function fromHex(s: string): Uint8Array | undefined {
  if (s.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(s)) return undefined;
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.slice(2 * i, 2 * i + 2), 16);
  return out;
}

export function toBase64(b: Uint8Array): string {
  let s = "";
  for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode(...b.subarray(i, i + 0x8000));
  return btoa(s);
}

export function fromBase64(s: string): Uint8Array {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** A LEB128 varint (postcard's encoding of lengths and integers up to 2^53). */
export function writeVarint(n: number): Uint8Array {
  if (!Number.isSafeInteger(n) || n < 0) throw new Error("varint out of range");
  const out: number[] = [];
  while (n >= 0x80) {
    out.push((n % 0x80) | 0x80);
    n = Math.floor(n / 0x80);
  }
  out.push(n);
  return Uint8Array.from(out);
}

export function readVarint(b: Uint8Array, r: { at: number }): number | undefined {
  let n = 0;
  let mul = 1;
  for (let i = 0; i < 10; i++) {
    const x = b[r.at++];
    if (x === undefined) return undefined;
    n += (x & 0x7f) * mul;
    if (!Number.isSafeInteger(n)) return undefined;
    if ((x & 0x80) === 0) return n;
    mul *= 0x80;
  }
  return undefined;
}

export function writeBytes(data: Uint8Array): Uint8Array {
  return concat([writeVarint(data.length), data]);
}

export function readBytes(b: Uint8Array, r: { at: number }): Uint8Array | undefined {
  const len = readVarint(b, r);
  if (len === undefined || r.at + len > b.length) return undefined;
  const out = b.slice(r.at, r.at + len);
  r.at += len;
  return out;
}

export function readFixed(b: Uint8Array, r: { at: number }, len: number): Uint8Array | undefined {
  if (r.at + len > b.length) return undefined;
  const out = b.slice(r.at, r.at + len);
  r.at += len;
  return out;
}
