// The private half of a key package, as bytes to keep until its Welcome arrives.

import type { PrivateKeyPackage } from "ts-mls";
import { concat, readBytes, writeBytes } from "./bytes.js";

export function encodePrivateKeyPackage(p: PrivateKeyPackage): Uint8Array {
  return concat([writeBytes(p.initPrivateKey), writeBytes(p.hpkePrivateKey), writeBytes(p.signaturePrivateKey)]);
}

export function decodePrivateKeyPackage(b: Uint8Array): PrivateKeyPackage | undefined {
  const r = { at: 0 };
  const initPrivateKey = readBytes(b, r);
  const hpkePrivateKey = readBytes(b, r);
  const signaturePrivateKey = readBytes(b, r);
  if (initPrivateKey === undefined || hpkePrivateKey === undefined || signaturePrivateKey === undefined) return undefined;
  return { initPrivateKey, hpkePrivateKey, signaturePrivateKey };
}
