// The device's keys and local history in IndexedDB, sealed under a key derived from the
// account's password, as the native client seals its local history (conclave-e2ee's
// history.rs): a random 32-byte key, stored wrapped (XChaCha20-Poly1305) under
// Argon2id(password, 16-byte salt) with the argon2 crate's default parameters (Argon2id v19,
// 19 MiB, 2 passes, 1 lane), so a copy of the browser's storage alone reveals nothing.
//
// One database per server origin; one object store of records keyed `user/name`; every value
// sealed with its key as associated data (a record cannot be moved to another name).

import { argon2idAsync } from "@noble/hashes/argon2.js";
import { xchacha20poly1305 } from "@noble/ciphers/chacha.js";
import { concat } from "./bytes.js";

/** Argon2id parameters: the argon2 crate's `Argon2::default()` (what the native client uses). */
export const ARGON2 = { t: 2, m: 19_456, p: 1, dkLen: 32 } as const;
const WRAP_AD = new TextEncoder().encode("conclave-history-key-v1");
const DB_NAME = "conclave";
const STORE = "sealed";
const NONCE = 24;

function openDb(): Promise<IDBDatabase> {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE);
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(new Error("the browser's storage (IndexedDB) is not available"));
  });
}

function tx<T>(db: IDBDatabase, mode: IDBTransactionMode, f: (s: IDBObjectStore) => IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    const t = db.transaction(STORE, mode);
    const r = f(t.objectStore(STORE));
    t.oncomplete = () => resolve(r.result);
    t.onerror = () => reject(new Error("the browser's storage refused a write (is it full?)"));
    t.onabort = () => reject(new Error("the browser's storage refused a write (is it full?)"));
  });
}

function seal(key: Uint8Array, ad: Uint8Array, plain: Uint8Array): Uint8Array {
  const nonce = crypto.getRandomValues(new Uint8Array(NONCE));
  return concat([nonce, xchacha20poly1305(key, nonce, ad).encrypt(plain)]);
}

function open(key: Uint8Array, ad: Uint8Array, sealed: Uint8Array): Uint8Array | undefined {
  if (sealed.length < NONCE + 16) return undefined;
  try {
    return xchacha20poly1305(key, sealed.subarray(0, NONCE), ad).decrypt(sealed.subarray(NONCE));
  } catch {
    return undefined;
  }
}

export class WrongPassword extends Error {
  constructor() {
    super("the password does not open what this browser keeps for this account");
  }
}

/** The sealed records of one account on this server. */
export class SealedStore {
  private constructor(
    private db: IDBDatabase,
    private user: string,
    private key: Uint8Array,
    /** True when the stored key did not open with this password (a new key now seals). */
    readonly reset: boolean,
  ) {}

  /** Opens (creating if needed) the account's store; the password unwraps its key. A stored
   * key that this password does not open is a `WrongPassword`, unless `reset` (the password
   * changed: a new key seals what follows; what was sealed before stays sealed). */
  static async open(user: string, password: string, reset = false): Promise<SealedStore> {
    const db = await openDb();
    const metaKey = `${user}/key`;
    const wrapped = (await tx(db, "readonly", (s) => s.get(metaKey))) as Uint8Array | undefined;
    const pw = new TextEncoder().encode(password);
    if (wrapped instanceof Uint8Array && wrapped.length > 16) {
      const salt = wrapped.subarray(0, 16);
      const kek = await argon2idAsync(pw, salt, ARGON2);
      const key = open(kek, WRAP_AD, wrapped.subarray(16));
      if (key !== undefined && key.length === 32) return new SealedStore(db, user, key, false);
      if (!reset) throw new WrongPassword();
    }
    // New here, or the password changed: what was sealed before stays sealed.
    const key = crypto.getRandomValues(new Uint8Array(32));
    const salt = crypto.getRandomValues(new Uint8Array(16));
    const kek = await argon2idAsync(pw, salt, ARGON2);
    await tx(db, "readwrite", (s) => s.put(concat([salt, seal(kek, WRAP_AD, key)]), metaKey));
    return new SealedStore(db, user, key, wrapped !== undefined);
  }

  async get(name: string): Promise<Uint8Array | undefined> {
    const k = `${this.user}/${name}`;
    const v = (await tx(this.db, "readonly", (s) => s.get(k))) as unknown;
    if (!(v instanceof Uint8Array)) return undefined;
    return open(this.key, new TextEncoder().encode(k), v);
  }

  async put(name: string, value: Uint8Array): Promise<void> {
    const k = `${this.user}/${name}`;
    await tx(this.db, "readwrite", (s) => s.put(seal(this.key, new TextEncoder().encode(k), value), k));
  }

  async getJson<T>(name: string): Promise<T | undefined> {
    const b = await this.get(name);
    if (b === undefined) return undefined;
    try {
      return JSON.parse(new TextDecoder().decode(b)) as T;
    } catch {
      return undefined;
    }
  }

  putJson(name: string, value: unknown): Promise<void> {
    return this.put(name, new TextEncoder().encode(JSON.stringify(value)));
  }
}
