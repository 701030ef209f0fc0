// The protocol connection: a WebSocket to the server's `/ws`, carrying the native protocol's
// `ClientFrame` / `ServerFrame` as serde JSON (externally tagged enums; byte strings as arrays
// of numbers). Requests carry ids; replies name them; events come at any time.
//
// The types are generated from conclave-proto's Rust types (src/generated/protocol.ts): every
// request this client sends is checked against them at compile time.

import type { Conv, ConvRef, Message, Request } from "./generated/protocol.js";
export type { Conv, ConvRef, Message, Request };

/** One JSON value of the protocol. */
export type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

/** How long a request waits for its reply. */
export const REQUEST_TIMEOUT_MS = 30_000;
/** Requests waiting for replies at once. */
export const MAX_IN_FLIGHT = 256;

export interface ServerError {
  code: string;
  message: string;
}

export class RequestError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/** The conversation key (`r:ROOM`, `d:A,B`), as the native client names conversations. */
export function convKey(c: Conv): string {
  return "Room" in c ? `r:${c.Room}` : `d:${c.Direct.join(",")}`;
}

export function bytesOut(b: Uint8Array): number[] {
  return Array.from(b);
}

export function bytesIn(v: unknown): Uint8Array {
  if (!Array.isArray(v)) throw new Error("expected a byte array");
  return Uint8Array.from(v as number[]);
}

/** The variant name and content of an externally tagged enum value. */
export function variant(v: unknown): [string, unknown] {
  if (typeof v === "string") return [v, null];
  if (v !== null && typeof v === "object") {
    const keys = Object.keys(v);
    if (keys.length === 1 && keys[0] !== undefined) return [keys[0], (v as Record<string, unknown>)[keys[0]]];
  }
  throw new Error("not an enum value");
}

interface Waiting {
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: ReturnType<typeof setTimeout>;
}

/** One WebSocket to the server. `onEvent` gets every event in order; `onClose` once. */
export class Connection {
  private ws: WebSocket;
  private next = 1;
  private waiting = new Map<number, Waiting>();
  private opened: Promise<void>;
  closed = false;

  constructor(
    url: string,
    private onEvent: (name: string, body: unknown) => void,
    private onClose: (why: string) => void,
  ) {
    this.ws = new WebSocket(url);
    this.opened = new Promise((resolve, reject) => {
      this.ws.addEventListener("open", () => resolve(), { once: true });
      this.ws.addEventListener("error", () => reject(new Error("cannot reach the server")), { once: true });
    });
    this.ws.addEventListener("message", (e) => this.receive(e.data));
    this.ws.addEventListener("close", (e) => this.close(e.reason || "the connection closed"));
  }

  ready(): Promise<void> {
    return this.opened;
  }

  private close(why: string): void {
    if (this.closed) return;
    this.closed = true;
    for (const w of this.waiting.values()) {
      clearTimeout(w.timer);
      w.reject(new RequestError("Disconnected", why));
    }
    this.waiting.clear();
    this.onClose(why);
  }

  shutdown(): void {
    this.ws.close(1000, "bye");
    this.close("closed");
  }

  private receive(data: unknown): void {
    if (typeof data !== "string") return;
    let frame: unknown;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    let name: string, body: unknown;
    try {
      [name, body] = variant(frame);
    } catch {
      return;
    }
    if (name === "Reply") {
      const r = body as { id: number; result: unknown };
      const w = this.waiting.get(r.id);
      if (w === undefined) return;
      this.waiting.delete(r.id);
      clearTimeout(w.timer);
      try {
        const [ok, value] = variant(r.result);
        if (ok === "Ok") w.resolve(value);
        else {
          const e = value as ServerError;
          w.reject(new RequestError(String(e.code), String(e.message)));
        }
      } catch (e) {
        w.reject(e instanceof Error ? e : new Error(String(e)));
      }
    } else if (name === "Event") {
      try {
        const [ev, content] = variant(body);
        this.onEvent(ev, content);
      } catch {
        // An event this client does not know: ignored.
      }
    }
  }

  /** Sends a request; resolves with the reply (its variant name and content). */
  async request(req: Request): Promise<[string, unknown]> {
    await this.opened;
    if (this.closed) throw new RequestError("Disconnected", "not connected");
    if (this.waiting.size >= MAX_IN_FLIGHT) throw new RequestError("RateLimited", "too many requests waiting");
    const id = this.next++;
    const reply = new Promise<unknown>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new RequestError("Timeout", "the server did not answer in time"));
      }, REQUEST_TIMEOUT_MS);
      this.waiting.set(id, { resolve, reject, timer });
    });
    this.ws.send(JSON.stringify({ id, req }));
    return variant(await reply);
  }
}
