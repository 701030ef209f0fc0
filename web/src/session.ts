// One signed-in session of the web client: the connection, the conversations and their
// timelines, and end-to-end encryption (this browser's MLS device), as the native client
// library does it (crates/conclave-client/src/e2ee.rs), with no DOM: the UI renders `state`
// and calls the methods.
//
// Every message of a conversation's log is processed once, in order (sequence numbers); a
// reconnect logs in again with the last sequence number seen of each conversation, so the
// server sends what was missed, and nothing twice.

import { applyShown, bodyText, describe, describeAct, ACT_DELETE, ACT_EDIT, ACT_REACT, ACT_UNREACT, CT_ACTION, CT_DELETE, CT_MARKDOWN, CT_MARKDOWN_ACTION, type Shown } from "./acts.js";
import { Connection, RequestError, bytesIn, bytesOut, convKey, variant, type Conv, type ConvRef, type Json, type Message, type Request } from "./protocol.js";
import type { Refs, RoomInfo, Target, UserPresence, WaitingDevice } from "./generated/protocol.js";
import { chunkAad, chunkSigned, chunksOf, decodeChunk, decodeSealed, encodeChunk, encodeSealed, TRANSFER_INFO, TRANSFER_KEY_LABEL, type Row } from "./transfer.js";
import { MlsDevice, type DeviceRecord, type Outgoing } from "./mls.js";
import { decodePayload, encodePayload, type Payload } from "./payload.js";
import { SealedStore, WrongPassword } from "./store.js";
import { concat, fromHex, toHex } from "./bytes.js";
import { xchacha20poly1305 } from "@noble/ciphers/chacha.js";
import { matchesQuery, mentionIn, outsideCode, queryWords } from "./attention.js";

export const CT_TEXT = "text/plain";
export const CT_APP = "application/mls-app";
export const CT_COMMIT = "application/mls-commit";
export const CT_PROPOSAL = "application/mls-proposal";

/** Shortest time between two typing notices sent to one conversation (the server's default). */
export const TYPING_INTERVAL_MS = 3_000;
/** Shortest time between two read markers sent for one conversation (a little over the
 * server's default `read_interval_ms`, 500). */
export const READ_INTERVAL_MS = 600;
/** How long "typing" shows after a notice (as the native clients). */
export const TYPING_SHOWN_MS = 6_000;

/** Entries kept per conversation in memory and in local history (as the TUI keeps). */
export const MAX_ENTRIES = 10_000;
/** Messages asked for when a conversation is opened or scrolled up. */
export const HISTORY_PAGE = 50;
/** Key packages published at a time, and the count under which more are published. */
export const KEY_PACKAGES_BATCH = 20;
export const KEY_PACKAGES_LOW = 10;
/** Attempts at a send or commit refused for a stale epoch. */
export const SEND_ATTEMPTS = 20;
/** Reconnect back-off, doubling from the first to the last. */
export const RECONNECT_MIN_MS = 500;
export const RECONNECT_MAX_MS = 15_000;
/** A Ping this often keeps an idle connection open (the server's idle timeout is 5 minutes). */
export const KEEPALIVE_MS = 60_000;
/** Blockcast keys kept (the newest), and sealed messages waiting for their key. */
export const MAX_SEALED_KEYS = 10_000;
/** Entries of a log read per request when catching up. */
export const FILL_PAGE = 100;
/** Most entries read to catch up one conversation at once. */
export const MAX_FILL = 10_000;
/** Attempts at storing one history chunk for a new device (its space on the server may be
 * full until it takes what waits), one every PUT_RETRY_MS. */
export const PUT_ATTEMPTS = 120;
export const PUT_RETRY_MS = 500;
/** Fetches of history chunks waiting for this device in one round (each bounded by the
 * server). */
export const MAX_FETCH_ROUNDS = 1_000;
/** Devices of the account remembered as waiting. */
export const MAX_WAITING = 64;
/** Tries of one send whose connection dropped before the reply, and the wait for the
 * connection to come back before each. */
export const RESEND_ATTEMPTS = 5;
export const RESEND_WAIT_MS = 60_000;
/** Search results shown (as the terminal client), and asked of the server at once. */
export const MAX_SEARCH_RESULTS = 100;
/** Replies of a thread asked of the server at once (the server pages bigger threads). */
export const THREAD_PAGE = 200;
/** Server pages of one thread read at most. */
export const MAX_THREAD_PAGES = 10;
/** Threads of server-encrypted conversations kept in memory (the newest opened). */
export const MAX_THREADS_KEPT = 16;

export interface Entry {
  seq: number;
  from: string;
  ts: number;
  text: string;
  /** The server's id of the message (edits and deletes name it). */
  msgId?: string;
  /** A notice of the client (joins, errors), not a message. */
  notice?: boolean;
  file?: { fileId: string; name: string; size: number; sha256: string; key?: string };
  /** Its text was edited. */
  edited?: boolean;
  /** It was deleted (the text is gone). */
  deleted?: boolean;
  /** Emoji → who reacted with it. */
  reactions?: Record<string, string[]>;
  /** The message it answers (its server id). */
  replyTo?: string;
  /** Its text is Markdown (`text/markdown`), rendered safely. */
  markdown?: boolean;
}

/** An act the composer sends on a line. */
export type ActRequest = { kind: "Edit"; text: string } | { kind: "Delete" } | { kind: "React" | "Unreact"; emoji: string };

export interface ConvState {
  key: string;
  conv: Conv;
  /** `#room` or the other people's names. */
  title: string;
  e2ee: boolean;
  entries: Entry[];
  unread: number;
  mentions: number;
  /** Muted (`/mute`): its messages and mentions are still counted, but make no desktop
   * notification and leave the tab's title alone, as the terminal client's mute. */
  muted?: boolean;
  /** Highest sequence number seen (shown or processed). */
  lastSeq: number;
  /** The oldest history was loaded. */
  complete: boolean;
  /** The room's topic, when set. */
  topic?: string;
  /** Who is typing here, until when (ms since the epoch). */
  typing?: Map<string, number>;
  /** Members' read markers here: user → highest sequence read. */
  reads?: Map<string, number>;
}

/** One search result: a line of a conversation. */
export interface Hit {
  key: string;
  title: string;
  entry: Entry;
  /** Found in this device's own history (an end-to-end conversation), not by the server. */
  local: boolean;
}

export interface SessionState {
  user: string;
  admin: boolean;
  connected: boolean;
  status: string;
  convs: Map<string, ConvState>;
  order: string[];
  current: string | undefined;
  fingerprint: string;
  device: string;
}

/** What the server says of a message it took. */
type Sent = { seq: number; ts_ms: number; msg_id: string };

export interface LoginOptions {
  url: string;
  user: string;
  password: string;
  register: boolean;
  serverPassword?: string;
  inviteCode?: string;
}

const enc = new TextEncoder();

function record2json(r: DeviceRecord): Json {
  return {
    user: r.user,
    device: r.device,
    signPublic: toHex(r.signPublic),
    signKey: toHex(r.signKey),
    keyPackages: r.keyPackages.map((k) => ({ pub: toHex(k.pub), priv: toHex(k.priv) })),
    groups: r.groups.map((g) => ({ conv: g.conv, state: toHex(g.state), lastSeq: g.lastSeq, joinedSeq: g.joinedSeq, active: g.active })),
  };
}

function json2record(j: Record<string, unknown>): DeviceRecord {
  const h = (v: unknown) => fromHex(String(v)) ?? new Uint8Array();
  return {
    user: String(j.user),
    device: String(j.device),
    signPublic: h(j.signPublic),
    signKey: h(j.signKey),
    keyPackages: (j.keyPackages as { pub: string; priv: string }[]).map((k) => ({ pub: h(k.pub), priv: h(k.priv) })),
    groups: (j.groups as { conv: string; state: string; lastSeq: number; joinedSeq: number; active: boolean }[]).map((g) => ({
      ...g,
      state: h(g.state),
    })),
  };
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** A queue that runs tasks one at a time, in order. */
class Serial {
  private tail: Promise<unknown> = Promise.resolve();
  run<T>(f: () => Promise<T>): Promise<T> {
    const p = this.tail.then(f, f);
    this.tail = p.catch(() => undefined);
    return p;
  }
}

export class Session {
  state: SessionState;
  private conn: Connection | undefined;
  private device!: MlsDevice;
  private store!: SealedStore;
  private serverKey: Uint8Array = new Uint8Array();
  private serial = new Serial();
  private saveTimer: ReturnType<typeof setTimeout> | undefined;
  private stopped = false;
  /** Keys of blockcast messages (by id, hex), and sealed messages waiting for theirs. */
  private sealedKeys = new Map<string, Uint8Array>();
  /** Conversations muted by `/mute` (by key), kept in the sealed store. */
  private mutedKeys = new Set<string>();
  private sealedWaiting = new Map<string, { m: Message; p: Payload; live: boolean }>();
  /** MLS messages of conversations this device is joining, until it is in. */
  private early = new Map<string, Message[]>();
  private releaseLock: () => void = () => {};
  private keepalive: ReturnType<typeof setInterval> | undefined;
  onChange: () => void = () => {};
  onNotify: (title: string, body: string) => void = () => {};
  isVisible: () => boolean = () => true;

  private constructor(private opts: LoginOptions) {
    this.state = {
      user: opts.user,
      admin: false,
      connected: false,
      status: "connecting…",
      convs: new Map(),
      order: [],
      current: undefined,
      fingerprint: "",
      device: "",
    };
  }

  /** Signs in (or registers), opens the sealed store and the device, and catches up. */
  static async start(opts: LoginOptions): Promise<Session> {
    const release = await holdDeviceLock(opts.user);
    const s = new Session(opts);
    s.releaseLock = release;
    try {
      await s.open();
    } catch (e) {
      s.stop();
      throw e;
    }
    return s;
  }

  private async open(): Promise<void> {
    const opts = this.opts;
    try {
      this.store = await SealedStore.open(opts.user, opts.password);
    } catch (e) {
      if (!(e instanceof WrongPassword)) throw e;
      // Sealed under another password: only once the server confirms this one (the account's
      // password changed) does a new device replace what this browser cannot open any more.
      await verifyPassword(opts);
      this.store = await SealedStore.open(opts.user, opts.password, true);
      this.notice(undefined, "the account's password changed: this browser starts a new device (earlier end-to-end history here stays sealed)");
    }
    const saved = await this.store.getJson<Record<string, unknown>>("device");
    this.device = saved !== undefined ? await MlsDevice.restore(json2record(saved)) : await MlsDevice.create(opts.user);
    if (saved === undefined) await this.saveDevice();
    this.state.device = this.device.device;
    this.state.fingerprint = await this.device.fingerprint();
    for (const [k, v] of (await this.store.getJson<[string, string][]>("sealed-keys")) ?? []) {
      const key = fromHex(v);
      if (key !== undefined) this.sealedKeys.set(k, key);
    }
    for (const k of (await this.store.getJson<string[]>("muted")) ?? []) {
      if (typeof k === "string") this.mutedKeys.add(k);
    }
    const index = (await this.store.getJson<{ key: string; conv: Conv; e2ee: boolean }[]>("convs")) ?? [];
    for (const c of index) {
      const entries = (await this.store.getJson<Entry[]>(`history/${c.key}`)) ?? [];
      const cs = this.ensureConv(c.conv, c.e2ee);
      cs.entries = entries;
      cs.lastSeq = entries.reduce((m, e) => Math.max(m, e.seq), 0);
    }
    await this.connect(true);
  }

  private ensureConv(conv: Conv, e2ee?: boolean): ConvState {
    const key = convKey(conv);
    let c = this.state.convs.get(key);
    if (c === undefined) {
      const title = "Room" in conv ? `#${conv.Room}` : conv.Direct.filter((u) => u !== this.state.user).join(", ") || this.state.user;
      c = { key, conv, title, e2ee: e2ee ?? false, entries: [], unread: 0, mentions: 0, lastSeq: 0, complete: false };
      if (this.mutedKeys.has(key)) c.muted = true;
      this.state.convs.set(key, c);
      this.state.order.push(key);
      this.state.current ??= key;
    } else if (e2ee !== undefined) {
      c.e2ee = e2ee;
    }
    return c;
  }

  private convRef(conv: Conv): ConvRef {
    if ("Room" in conv) return { Room: conv.Room };
    const others = conv.Direct.filter((u) => u !== this.state.user);
    return { With: others.length === 0 ? [this.state.user] : others };
  }

  private async request(req: Request): Promise<[string, unknown]> {
    if (this.conn === undefined) throw new RequestError("Disconnected", "not connected");
    return this.conn.request(req);
  }

  /** A send, again with the same idempotency key when the connection dropped before its
   * reply came (the server may have taken it: it answers a repeat with the same message, so
   * nothing is sent twice and what was sent is shown here). */
  private async sendOnce(req: Request): Promise<Sent> {
    for (let attempt = 1; ; attempt++) {
      try {
        const [, sent] = await this.request(req);
        return sent as Sent;
      } catch (e) {
        if (!(e instanceof RequestError && (e.code === "Disconnected" || e.code === "Timeout")) || attempt >= RESEND_ATTEMPTS || this.stopped) throw e;
        await this.waitConnected();
      }
    }
  }

  /** Waits (at most RESEND_WAIT_MS) until the session is connected again. */
  private async waitConnected(): Promise<void> {
    for (let waited = 0; waited < RESEND_WAIT_MS && !this.stopped; waited += 100) {
      if (this.state.connected && this.conn !== undefined && !this.conn.closed) return;
      await sleep(100);
    }
  }

  // --- connection ---------------------------------------------------------------------------

  private async connect(first: boolean): Promise<void> {
    const conn = new Connection(
      this.opts.url,
      (name, body) => {
        void this.serial.run(() => this.onEvent(name, body));
      },
      (why) => {
        if (this.conn === conn) this.disconnected(why);
      },
    );
    this.conn = conn;
    await conn.ready();
    const resume = [...this.state.convs.values()]
      .filter((c) => c.lastSeq > 0)
      .map((c) => ({ conv: c.conv, seq: c.lastSeq }));
    // Registering signs in too; every later connection logs in (with what it has seen).
    const [, li] =
      first && this.opts.register
        ? await conn.request({
            Register: {
              user: this.opts.user,
              password: this.opts.password,
              server_password: this.opts.serverPassword ?? null,
              invite_code: this.opts.inviteCode ?? null,
            },
          })
        : await conn.request({
            Login: { user: this.opts.user, password: this.opts.password, server_password: this.opts.serverPassword ?? null, resume },
          });
    const logged = li as { user: string; admin: boolean; rooms: string[] };
    this.state.admin = logged.admin;
    this.state.connected = true;
    clearInterval(this.keepalive);
    let nonce = 0;
    this.keepalive = setInterval(() => {
      if (this.conn === conn && !conn.closed) void conn.request({ Ping: { nonce: ++nonce } }).catch(() => undefined);
    }, KEEPALIVE_MS);
    this.state.status = "connected";
    await this.serial.run(async () => {
      await this.publishDevice();
      await this.announceDevice(first);
      await this.takeHistory();
      await this.refreshRooms(logged.rooms);
      await this.joinMissingGroups();
    });
    this.onChange();
  }

  private disconnected(why: string): void {
    clearInterval(this.keepalive);
    this.state.connected = false;
    this.state.status = `disconnected (${why}); reconnecting…`;
    this.onChange();
    if (this.stopped) return;
    void (async () => {
      let wait = RECONNECT_MIN_MS;
      while (!this.stopped) {
        await sleep(wait);
        try {
          await this.connect(false);
          return;
        } catch (e) {
          this.state.status = `cannot reconnect (${e instanceof Error ? e.message : String(e)}); trying again…`;
          this.onChange();
          wait = Math.min(wait * 2, RECONNECT_MAX_MS);
        }
      }
    })();
  }

  /** Closes the connection (for tests and sign-out). */
  stop(): void {
    this.stopped = true;
    this.conn?.shutdown();
    this.releaseLock();
  }

  /** Drops the connection as a network failure would (the session reconnects). */
  dropConnection(): void {
    this.conn?.shutdown();
  }

  private async refreshRooms(rooms: string[]): Promise<void> {
    const [, list] = await this.request("Rooms");
    const infos = list as RoomInfo[];
    this.noteOwners(infos);
    const e2ee = new Map(infos.map((r) => [r.room, r.e2ee]));
    for (const room of rooms) this.ensureConv({ Room: room }, e2ee.get(room) ?? false);
    for (const c of this.state.convs.values()) {
      if (c.entries.length === 0) await this.loadHistory(c.key);
    }
    await this.saveIndex();
  }

  // --- persistence ------------------------------------------------------------------------

  private async saveDevice(): Promise<void> {
    await this.store.putJson("device", record2json(this.device.record()));
  }

  private scheduleSave(): void {
    if (this.saveTimer !== undefined) return;
    this.saveTimer = setTimeout(() => {
      this.saveTimer = undefined;
      void this.serial.run(() => this.saveDevice());
    }, 50);
  }

  private async saveIndex(): Promise<void> {
    const index = [...this.state.convs.values()].map((c) => ({ key: c.key, conv: c.conv, e2ee: c.e2ee }));
    await this.store.putJson("convs", index);
  }

  private async saveHistory(c: ConvState): Promise<void> {
    await this.store.putJson(`history/${c.key}`, c.entries.filter((e) => !e.notice).slice(-MAX_ENTRIES));
  }

  // --- timeline ---------------------------------------------------------------------------

  private addEntry(c: ConvState, e: Entry, live: boolean): boolean {
    if (!e.notice && c.entries.some((x) => !x.notice && x.seq === e.seq)) return false;
    // Kept in sequence order (history pages arrive before or after live messages).
    let i = c.entries.length;
    while (i > 0 && !e.notice && (c.entries[i - 1]?.seq ?? 0) > e.seq) i--;
    c.entries.splice(i, 0, e);
    if (c.entries.length > MAX_ENTRIES) c.entries.splice(0, c.entries.length - MAX_ENTRIES);
    if (!e.notice) c.lastSeq = Math.max(c.lastSeq, e.seq);
    if (live && !e.notice && e.from !== this.state.user) {
      const visible = this.state.current === c.key && this.isVisible();
      if (!visible) c.unread++;
      const room = "Room" in c.conv ? c.conv.Room : undefined;
      const fromOwner = room !== undefined && this.owners.get(room) === e.from;
      const mention = mentionIn(e.markdown === true ? outsideCode(e.text) : e.text, this.state.user, fromOwner);
      if (mention !== undefined || ("Direct" in c.conv && !visible)) {
        if (!visible) c.mentions++;
        if (c.muted !== true) this.onNotify(`${e.from} in ${c.title}`, e.text);
      }
    }
    return true;
  }

  /** Mutes or unmutes a conversation; kept (sealed) for the next sign-in. */
  async setMuted(key: string, on: boolean): Promise<void> {
    if (on) this.mutedKeys.add(key);
    else this.mutedKeys.delete(key);
    const c = this.state.convs.get(key);
    if (c !== undefined) c.muted = on;
    await this.store.putJson("muted", [...this.mutedKeys]);
    this.onChange();
  }

  notice(key: string | undefined, text: string): void {
    const c = key === undefined ? undefined : this.state.convs.get(key);
    const target = c ?? (this.state.current ? this.state.convs.get(this.state.current) : undefined);
    if (target === undefined) {
      this.state.status = text;
    } else {
      target.entries.push({ seq: target.lastSeq, from: "", ts: Date.now(), text, notice: true });
    }
    this.onChange();
  }

  private showPlain(m: Message, live: boolean): void {
    const c = this.ensureConv(m.conv);
    const shown = describe(m);
    if (shown.kind === "line") {
      const reactions: Record<string, string[]> = {};
      for (const r of m.extra?.state?.reactions ?? []) reactions[r.emoji] = [...r.users];
      const entry: Entry = { seq: m.seq, from: m.from, ts: m.ts_ms, text: shown.text, msgId: m.msg_id, reactions };
      if (m.extra?.state?.deleted === true) entry.deleted = true;
      if (m.extra?.reply_to != null) entry.replyTo = m.extra.reply_to;
      if (m.body.content_type.startsWith(CT_MARKDOWN)) entry.markdown = true;
      if (this.addEntry(c, entry, live)) void this.saveHistory(c);
      return;
    }
    // An act changes the line it names (when loaded here); it is no line itself.
    c.lastSeq = Math.max(c.lastSeq, m.seq);
    this.applyAct(c, shown, m.from);
  }

  /** Applies an edit, delete or reaction to the line it names (a new entry object, so the
   * timeline redraws that row). */
  private applyAct(c: ConvState, shown: Shown, by: string): void {
    if (shown.kind === "line") return;
    for (const list of this.threads.values()) {
      const k = list.findIndex((e) => e.msgId === shown.target);
      const t = list[k];
      if (t !== undefined) list[k] = applyShown(t, shown, by);
    }
    const i = c.entries.findIndex((e) => !e.notice && e.msgId === shown.target);
    const target = c.entries[i];
    if (target !== undefined) {
      c.entries[i] = applyShown(target, shown, by);
      // Replies quoting it are redrawn (a deleted original's text is no longer quoted).
      c.entries.forEach((e, j) => {
        if (e.replyTo === shown.target) c.entries[j] = { ...e };
      });
      void this.saveHistory(c);
    }
    this.onChange();
  }

  private showPayload(m: Message, p: Payload | undefined, live: boolean): void {
    const c = this.ensureConv(m.conv, true);
    let entry: Entry;
    if (p?.kind === "body") {
      entry = { seq: m.seq, from: m.from, ts: m.ts_ms, text: bodyText(p.contentType, p.data, m.from), msgId: m.msg_id };
      if (m.extra?.reply_to != null) entry.replyTo = m.extra.reply_to;
      if (p.contentType.startsWith(CT_MARKDOWN)) entry.markdown = true;
    } else if (p?.kind === "act") {
      // An edit, delete or reaction inside the ciphertext; its cleartext reference must agree.
      const shown = describeAct(p, m.extra?.acts_on, m.from);
      if (shown === undefined) {
        this.notice(c.key, `an act from ${m.from} whose reference does not match its ciphertext was dropped`);
        return;
      }
      this.applyAct(c, shown, m.from);
      return;
    } else if (p?.kind === "file") {
      entry = {
        seq: m.seq,
        from: m.from,
        ts: m.ts_ms,
        text: `offers the file ${p.name} (${p.size} bytes)`,
        msgId: m.msg_id,
        file: { fileId: p.fileId, name: p.name, size: p.size, sha256: toHex(p.sha256), key: toHex(p.key) },
      };
    } else if (p?.kind === "sealed_key") {
      // Blockcast, part 1: the key of a room message meant for me (and not for some others).
      const id = toHex(p.id);
      this.sealedKeys.set(id, p.key);
      while (this.sealedKeys.size > MAX_SEALED_KEYS) this.sealedKeys.delete(this.sealedKeys.keys().next().value as string);
      void this.store.putJson("sealed-keys", [...this.sealedKeys].map(([k, v]) => [k, toHex(v)]));
      const waiting = this.sealedWaiting.get(id);
      if (waiting !== undefined) {
        this.sealedWaiting.delete(id);
        this.showPayload(waiting.m, waiting.p, waiting.live);
      }
      return;
    } else if (p?.kind === "sealed") {
      // Blockcast, part 2: the message itself, in the room, opened with its key.
      const id = toHex(p.id);
      const key = this.sealedKeys.get(id);
      if (key === undefined) {
        if (this.sealedWaiting.size < MAX_SEALED_KEYS) this.sealedWaiting.set(id, { m, p, live });
        return;
      }
      let inner: Payload | undefined;
      try {
        inner = decodePayload(xchacha20poly1305(key, p.nonce, p.id).decrypt(p.ciphertext));
      } catch {
        inner = undefined;
      }
      if (inner?.kind !== "body") {
        this.notice(c.key, `a message from ${m.from} does not open with its key`);
        return;
      }
      this.showPayload(m, inner, live);
      return;
    } else {
      return;
    }
    if (this.addEntry(c, entry, live)) void this.saveHistory(c);
  }

  /** Loads older messages of a conversation from the server (server-encrypted ones; an
   * end-to-end conversation's history is what this device read, kept locally). */
  async loadHistory(key: string): Promise<void> {
    const c = this.state.convs.get(key);
    if (c === undefined || c.complete) return;
    const oldest = c.entries.find((e) => !e.notice)?.seq;
    const [, msgs] = await this.request({
      History: { conv: this.convRef(c.conv), limit: HISTORY_PAGE, before: oldest ?? null },
    });
    const list = msgs as Message[];
    if (list.length < HISTORY_PAGE) c.complete = true;
    for (const m of list) {
      if (!isMls(m.body.content_type)) this.showPlain(m, false);
    }
    if (c.lastSeq === 0 && list.length > 0) c.lastSeq = Math.max(...list.map((m) => m.seq));
    this.onChange();
  }

  // --- events -----------------------------------------------------------------------------

  private async onEvent(name: string, body: unknown): Promise<void> {
    switch (name) {
      case "Message": {
        const m = body as Message;
        if (isMls(m.body.content_type)) await this.processMls(m, true);
        else this.showPlain(m, true);
        break;
      }
      case "E2eeWelcome": {
        const w = body as { id: number; device: string; conv: Conv; seq: number; welcome: number[] };
        if (w.device !== this.device.device) break;
        const key = convKey(w.conv);
        const later = this.device.confirmed(key) && (this.device.lastSeq(key) ?? 0) >= w.seq;
        if (!later) {
          try {
            await this.device.joinWelcome(key, bytesIn(w.welcome), w.seq);
            this.ensureConv(w.conv, true);
            await this.saveDevice();
            await this.saveIndex();
            await this.joined(key);
          } catch (e) {
            this.notice(key, `an invitation's Welcome could not be used: ${errText(e)}`);
          }
        }
        await this.request({ E2eeWelcomeDone: { id: w.id } }).catch(() => undefined);
        break;
      }
      case "Join": {
        const j = body as { room: string; user: string };
        const c = this.ensureConv({ Room: j.room });
        this.membersChanged++;
        if (j.user !== this.state.user) this.notice(c.key, `${j.user} joined`);
        break;
      }
      case "Part": {
        const p = body as { room: string; user: string };
        const key = convKey({ Room: p.room });
        this.membersChanged++;
        if (p.user === this.state.user) this.device.forget(key);
        else this.notice(key, `${p.user} left`);
        break;
      }
      case "Kicked": {
        const k = body as { room: string | null; user: string; by: string; reason: string };
        if (k.room === null) break;
        const key = convKey({ Room: k.room });
        this.notice(key, `${k.user} was removed by ${k.by}${k.reason ? `: ${k.reason}` : ""}`);
        if (k.user === this.state.user) {
          this.device.forget(key);
          this.scheduleSave();
        }
        break;
      }
      case "FileOffer": {
        const o = body as { file_id: string; from: string; conv: Conv; name: string; size: number; sha256: number[]; ts_ms: number };
        // An end-to-end file is shown from its description (an MLS message), not its offer.
        if (o.from === this.state.user || (o.name.startsWith("e2ee-") && o.name.endsWith(".bin"))) break;
        const c = this.ensureConv(o.conv);
        const file = { fileId: o.file_id, name: o.name, size: o.size, sha256: toHex(bytesIn(o.sha256)) };
        c.entries.push({ seq: c.lastSeq, from: o.from, ts: o.ts_ms, text: `offers the file ${o.name} (${o.size} bytes)`, notice: true, file });
        break;
      }
      case "Invited": {
        const i = body as { room: string; by: string };
        this.notice(undefined, `${i.by} invited you to #${i.room}: /join ${i.room}`);
        break;
      }
      case "Topic": {
        const t = body as { room: string; topic: string; by: string };
        const c = this.ensureConv({ Room: t.room });
        c.topic = t.topic;
        this.notice(c.key, t.topic === "" ? `${t.by} cleared the topic` : `${t.by} set the topic: ${t.topic}`);
        break;
      }
      case "Typing": {
        const t = body as { conv: Conv; user: string };
        if (t.user === this.state.user) break;
        const c = this.ensureConv(t.conv);
        c.typing ??= new Map();
        c.typing.set(t.user, Date.now() + TYPING_SHOWN_MS);
        // Redrawn when it expires.
        setTimeout(() => this.onChange(), TYPING_SHOWN_MS + 50);
        break;
      }
      case "Read": {
        const r = body as { conv: Conv; user: string; seq: number };
        const c = this.ensureConv(r.conv);
        c.reads ??= new Map();
        c.reads.set(r.user, Math.max(c.reads.get(r.user) ?? 0, r.seq));
        break;
      }
      case "Presence": {
        const pr = body as { user: string; online: boolean };
        if (pr.online) this.online.add(pr.user);
        else this.online.delete(pr.user);
        break;
      }
      case "Away": {
        const a = body as { user: string; text: string | null };
        if (a.text === null) this.away.delete(a.user);
        else this.away.set(a.user, a.text);
        break;
      }
      case "TransferReady": {
        const t = body as { device: string };
        if (t.device === this.device.device) await this.takeHistory();
        break;
      }
      case "DeviceWaiting": {
        const w = body as WaitingDevice;
        if (w.device === this.device.device) break;
        if (w.state === "waiting") {
          if (this.waiting.size >= MAX_WAITING) this.waiting.clear();
          const isNew = !this.waiting.has(w.device);
          this.waiting.set(w.device, w);
          if (isNew) this.notice(undefined, `a new device of yours (${w.device}) asks for your end-to-end history: compare its safety number, then approve or reject it`);
        } else {
          this.waiting.delete(w.device);
          this.notice(undefined, `your device ${w.device} was ${w.state}`);
        }
        break;
      }
      case "DisplayName": {
        const d = body as { user: string; name: string | null };
        if (d.name === null) this.displayNames.delete(d.user);
        else this.displayNames.set(d.user, d.name);
        break;
      }
      case "Announce": {
        const a = body as { from: string; text: string };
        this.notice(undefined, `announcement from ${a.from}: ${a.text}`);
        break;
      }
      case "Disconnect": {
        const d = body as { reason: string; message: string };
        this.state.status = `the server closed the connection: ${d.message}`;
        if (d.reason === "Kicked" || d.reason === "Banned") this.stopped = true;
        break;
      }
      default:
        break;
    }
    this.onChange();
  }

  private async processMls(m: Message, live: boolean): Promise<void> {
    const key = convKey(m.conv);
    if (!this.device.confirmed(key)) {
      // Not in the group (yet): kept until this device is, then processed in order.
      const q = this.early.get(key) ?? [];
      if (q.length < MAX_FILL) q.push(m);
      this.early.set(key, q);
      return;
    }
    const last = this.device.lastSeq(key) ?? 0;
    if (m.seq > last + 1) await this.catchUp(m.conv, m.seq - 1);
    await this.processOne(m, live);
  }

  private async processOne(m: Message, live: boolean): Promise<void> {
    const key = convKey(m.conv);
    if (!this.device.has(key)) return;
    const p = await this.device.process(key, m.seq, m.from, Uint8Array.from(m.body.data));
    const c = this.ensureConv(m.conv, true);
    c.lastSeq = Math.max(c.lastSeq, m.seq);
    switch (p.kind) {
      case "app":
        this.showPayload(m, decodePayload(p.plaintext), live);
        break;
      case "commit":
        if (p.removedSelf) this.notice(key, "this device was removed from the conversation's encryption group: it can read nothing more here");
        for (const a of p.added) if (a.user !== this.state.user) this.notice(key, `${a.user} (device ${a.device}, safety number ${a.fingerprint}) is in the group`);
        break;
      case "proposal":
        this.scheduleSave();
        void this.commitPending(m.conv);
        break;
      default:
        break;
    }
    this.scheduleSave();
  }

  /** Reads the conversation's log after what this device processed, up to `upto`. */
  private async catchUp(conv: Conv, upto?: number): Promise<void> {
    const key = convKey(conv);
    const last = this.device.lastSeq(key);
    if (last === undefined) return;
    let end = upto;
    if (end === undefined) {
      const [, newest] = await this.request({ History: { conv: this.convRef(conv), limit: 1, before: null } });
      const n = (newest as Message[]).at(-1);
      if (n === undefined) return;
      end = n.seq;
    }
    let next = Math.max(last + 1, end - MAX_FILL + 1);
    for (let rounds = 0; next <= end && rounds < 4 * (MAX_FILL / FILL_PAGE + 1); rounds++) {
      const w = Math.min(FILL_PAGE, end - next + 1);
      const [, page] = await this.request({ History: { conv: this.convRef(conv), limit: w, before: next + w } });
      for (const m of (page as Message[]).filter((x) => x.seq >= next && x.seq < next + w)) {
        if (isMls(m.body.content_type)) await this.processOne(m, false);
      }
      next += w;
    }
  }

  private async joined(key: string): Promise<void> {
    const q = this.early.get(key) ?? [];
    this.early.delete(key);
    for (const m of q) await this.processOne(m, true);
  }

  // --- end-to-end groups --------------------------------------------------------------------

  private async publishDevice(): Promise<void> {
    const kps = await this.device.keyPackagesOut(1);
    const [, ready] = await this.request({ E2eePublish: { device: this.device.device, key_packages: kps.map(bytesOut) } });
    const r = ready as { server_key: number[]; key_packages: number };
    this.serverKey = bytesIn(r.server_key);
    if (r.key_packages < KEY_PACKAGES_LOW) {
      const more = await this.device.keyPackagesOut(KEY_PACKAGES_BATCH);
      await this.request({ E2eePublish: { device: this.device.device, key_packages: more.map(bytesOut) } });
    }
    await this.saveDevice();
  }

  private async joinMissingGroups(): Promise<void> {
    const [, list] = await this.request("E2eeConvs");
    for (const conv of list as Conv[]) {
      const key = convKey(conv);
      this.ensureConv(conv, true);
      if (this.device.confirmed(key) && this.device.isActive(key)) {
        await this.catchUp(conv);
      } else {
        try {
          await this.joinGroup(conv);
        } catch (e) {
          this.notice(key, `could not join the encryption group: ${errText(e)}`);
        }
      }
    }
    await this.saveIndex();
  }

  /** Sends a commit; adopts it once the server ordered it, drops it when refused. */
  private async commit(conv: Conv, out: Outgoing): Promise<number> {
    const key = convKey(conv);
    try {
      const [, sent] = await this.request({
        E2eeCommit: {
          conv: this.convRef(conv),
          commit: bytesOut(out.commit),
          group_info: bytesOut(out.groupInfo),
          welcome: out.welcome === undefined ? null : bytesOut(out.welcome),
        },
      });
      const seq = (sent as { seq: number }).seq;
      this.device.confirm(key, seq);
      await this.saveDevice();
      return seq;
    } catch (e) {
      this.device.discard(key);
      throw e;
    }
  }

  /** Joins a conversation's group by external commit; false when it is not end-to-end. */
  private async joinGroup(conv: Conv): Promise<boolean> {
    const key = convKey(conv);
    for (let attempt = 0; attempt < SEND_ATTEMPTS; attempt++) {
      const [, info] = await this.request({ E2eeGroupInfo: { conv: this.convRef(conv) } });
      if (info === null) return false;
      const gi = info as { group_info: number[]; epoch: number; seq: number };
      if (this.device.confirmed(key) && this.device.isActive(key) && Number(this.device.epoch(key)) === gi.epoch) return true;
      this.device.forget(key);
      const out = await this.device.joinExternal(key, bytesIn(gi.group_info));
      try {
        await this.commit(conv, out);
        this.ensureConv(conv, true);
        await this.joined(key);
        return true;
      } catch (e) {
        if (!(e instanceof RequestError && e.code === "StaleEpoch")) throw e;
        await sleep(50 + Math.random() * 100);
      }
    }
    throw new Error("the group kept changing while joining; try again later");
  }

  private async commitPending(conv: Conv): Promise<void> {
    await sleep(Math.random() * 150);
    await this.serial.run(async () => {
      const key = convKey(conv);
      if (!this.device.has(key) || !this.device.hasPendingProposals(key)) return;
      const out = await this.device.commitPending(key);
      if (out === undefined) return;
      try {
        await this.commit(conv, out);
      } catch {
        // Another member committed the removal first.
      }
    });
  }

  private async addDevices(conv: Conv, users: string[]): Promise<void> {
    const key = convKey(conv);
    const [, claimed] = await this.request({ E2eeClaim: { users } });
    const mine = new Set((await this.device.members(key)).map((m) => `${m.user}/${m.device}`));
    const kps = (claimed as { user: string; device: string; key_package: number[] }[])
      .filter((k) => !mine.has(`${k.user}/${k.device}`) && k.device !== this.device.device)
      .map((k) => bytesIn(k.key_package));
    if (kps.length === 0) return;
    const out = await this.device.addMembers(key, kps);
    await this.commit(conv, out);
  }

  private async ensureDirectGroup(to: string[]): Promise<boolean> {
    const others = to.filter((u) => u !== this.state.user);
    const all = [...new Set([...to, this.state.user])].sort();
    const conv: Conv = { Direct: all };
    const key = convKey(conv);
    if (this.device.has(key)) return true;
    for (const u of others) {
      const [, devices] = await this.request({ E2eeDevices: { user: u } });
      if ((devices as unknown[]).length === 0) return false;
    }
    const gi = await this.device.createGroup(key, this.serverKey);
    try {
      await this.request({ E2eeCreate: { conv: this.convRef(conv), group_info: bytesOut(gi) } });
    } catch (e) {
      this.device.forget(key);
      if (e instanceof RequestError && e.code === "RoomExists") {
        // The other side made it first: its Welcome is on the way (an event, after this).
        throw new Error("the other side is setting up this end-to-end conversation; send again in a moment");
      }
      throw e;
    }
    this.device.confirm(key, 0);
    this.ensureConv(conv, true);
    await this.saveDevice();
    if (others.length > 0) await this.addDevices(conv, [...others, this.state.user]);
    return true;
  }

  // --- commands ---------------------------------------------------------------------------

  /** Sends text to a conversation (end-to-end when it is); `action` sends it as `/me`. */
  async send(key: string, text: string, except: string[] = [], opts: { action?: boolean; replyTo?: string; markdown?: boolean } = {}): Promise<void> {
    const contentType = opts.markdown === true ? (opts.action === true ? CT_MARKDOWN_ACTION : CT_MARKDOWN) : opts.action === true ? CT_ACTION : CT_TEXT;
    const data = enc.encode(text);
    const refs: Refs | null = opts.replyTo !== undefined ? { reply_to: opts.replyTo, acts_on: null } : null;
    await this.sendBody(key, contentType, data, refs, { kind: "body", contentType, data }, except, (c, s) => {
      const entry: Entry = { seq: s.seq, from: this.state.user, ts: s.ts_ms, text: bodyText(contentType, data, this.state.user), msgId: s.msg_id };
      if (opts.replyTo !== undefined) entry.replyTo = opts.replyTo;
      if (opts.markdown === true) entry.markdown = true;
      this.addEntry(c, entry, false);
    });
  }

  /** Edits, deletes or reacts to the line `msgId` of a conversation (inside the ciphertext in
   * an end-to-end one, with the cleartext reference the server checks). */
  async act(key: string, msgId: string, act: ActRequest): Promise<void> {
    const contentType = act.kind === "Delete" ? CT_DELETE : CT_TEXT;
    const data = act.kind === "Edit" ? enc.encode(act.text) : act.kind === "Delete" ? new Uint8Array(0) : enc.encode(act.emoji);
    const code = act.kind === "Edit" ? ACT_EDIT : act.kind === "Delete" ? ACT_DELETE : act.kind === "React" ? ACT_REACT : ACT_UNREACT;
    const refs: Refs = { reply_to: null, acts_on: { msg_id: msgId, kind: act.kind } };
    const shown: Shown =
      act.kind === "Edit"
        ? { kind: "edit", target: msgId, text: act.text }
        : act.kind === "Delete"
          ? { kind: "delete", target: msgId }
          : { kind: "reaction", target: msgId, emoji: act.emoji, on: act.kind === "React" };
    await this.sendBody(key, contentType, data, refs, { kind: "act", msgId, act: code, contentType, data }, [], (c) => this.applyAct(c, shown, this.state.user));
  }

  private async sendBody(
    key: string,
    contentType: string,
    body: Uint8Array,
    refs: Refs | null,
    payload: Payload,
    except: string[],
    sentOk: (c: ConvState, s: { seq: number; ts_ms: number; msg_id: string }) => void,
  ): Promise<void> {
    const c = this.state.convs.get(key);
    if (c === undefined) throw new Error("no such conversation");
    const target: Target =
      "Room" in c.conv ? { Room: { room: c.conv.Room, except } } : { Users: { to: c.conv.Direct.filter((u) => u !== this.state.user) } };
    await this.serial.run(async () => {
      if ("Direct" in c.conv && !this.device.has(key)) {
        const others = c.conv.Direct.filter((u) => u !== this.state.user);
        c.e2ee = await this.ensureDirectGroup(others.length === 0 ? [this.state.user] : others);
      }
      const idem = crypto.randomUUID();
      if (!c.e2ee || !this.device.has(key)) {
        const sent = await this.sendOnce({ Send: { target, body: { content_type: contentType, data: bytesOut(body) }, idempotency_key: idem, refs } });
        sentOk(c, sent);
        await this.saveHistory(c);
        return;
      }
      const sent =
        except.length > 0 && "Room" in c.conv
          ? await this.blockcast(c, c.conv.Room, except, contentType, body, refs)
          : await this.sendMls(c.conv, target, payload, refs);
      sentOk(c, sent);
      await this.saveHistory(c);
    });
    this.onChange();
  }

  /** Encrypts a payload for a conversation's group and sends it, again after a commit moved
   * the group on (StaleEpoch), committing pending removals first. Runs inside `serial`. */
  private async sendMls(conv: Conv, target: Target, payload: Payload, refs: Refs | null): Promise<Sent> {
    const key = convKey(conv);
    const idem = crypto.randomUUID();
    for (let attempt = 0; attempt < SEND_ATTEMPTS; attempt++) {
      if (this.device.hasPendingProposals(key)) {
        const out = await this.device.commitPending(key);
        if (out !== undefined) await this.commit(conv, out).catch(() => undefined);
        await this.catchUp(conv);
        continue;
      }
      const data = await this.device.encrypt(key, encodePayload(payload));
      // Saved before it leaves: a reload must never encrypt again under the same key.
      await this.saveDevice();
      try {
        return await this.sendOnce({ Send: { target, body: { content_type: CT_APP, data: bytesOut(data) }, idempotency_key: idem, refs } });
      } catch (e) {
        if (!(e instanceof RequestError && e.code === "StaleEpoch")) throw e;
        await this.catchUp(conv);
      }
    }
    throw new Error("the conversation's group kept changing; the message was not sent. Try again");
  }

  /** Blockcast in an end-to-end room, as the native client does it (conclave-client's
   * e2ee.rs `blockcast`): the body is sealed under a fresh key (XChaCha20-Poly1305, the id as
   * associated data); the key goes only to the intended members, in the end-to-end direct
   * conversation of this user and them, and the sealed body to the room with the left-out
   * members excepted. A left-out member's device never gets the key, so even a copy of the
   * room's message is unreadable to it. Runs inside `serial`. */
  private async blockcast(c: ConvState, room: string, except: string[], contentType: string, body: Uint8Array, refs: Refs | null): Promise<Sent> {
    const me = this.state.user;
    const intended = [...new Set((await this.device.members(c.key)).map((m) => m.user))].filter((u) => u !== me && !except.includes(u)).sort();
    const id = crypto.getRandomValues(new Uint8Array(16));
    const msgKey = crypto.getRandomValues(new Uint8Array(32));
    const nonce = crypto.getRandomValues(new Uint8Array(24));
    const ciphertext = xchacha20poly1305(msgKey, nonce, id).encrypt(encodePayload({ kind: "body", contentType, data: body }));
    if (intended.length > 0) {
      const all = [...new Set([...intended, me])].sort();
      const dm: Conv = { Direct: all };
      if (!this.device.has(convKey(dm)) && !(await this.ensureDirectGroup(intended))) {
        throw new Error("a member has no end-to-end device; cannot leave others out here");
      }
      await this.sendMls(dm, { Users: { to: intended } }, { kind: "sealed_key", id, key: msgKey }, null);
    }
    // A reply keeps its reference (in clear, as for every message, for threads).
    const kept = refs !== null && refs.acts_on === null ? refs : null;
    return this.sendMls(c.conv, { Room: { room, except } }, { kind: "sealed", id, nonce, ciphertext }, kept);
  }

  async join(room: string, password?: string): Promise<void> {
    const [, j] = await this.request({ Join: { room, password: password ?? null } });
    const name = (j as { room: string }).room;
    const conv: Conv = { Room: name };
    await this.serial.run(async () => {
      // A failed join leaves the room marked server-encrypted here; the server refuses
      // readable sends to an end-to-end room, so nothing leaks.
      const e2ee = await this.joinGroup(conv).catch((e: unknown) => {
        this.notice(convKey(conv), `could not join the encryption group: ${errText(e)}`);
        return false;
      });
      const c = this.ensureConv(conv, e2ee);
      this.state.current = c.key;
      const [, rooms] = await this.request("Rooms");
      this.noteOwners(rooms as RoomInfo[]);
      if (c.entries.length === 0 && !e2ee) await this.loadHistory(c.key);
      await this.saveIndex();
    });
    this.onChange();
  }

  async create(room: string, opts: { private: boolean; server: boolean; password?: string }): Promise<void> {
    await this.request({ CreateRoom: { room, private: opts.private, password: opts.password ?? null } });
    const conv: Conv = { Room: room };
    const key = convKey(conv);
    await this.serial.run(async () => {
      if (!opts.server) {
        const gi = await this.device.createGroup(key, this.serverKey);
        await this.request({ E2eeCreate: { conv: { Room: room }, group_info: bytesOut(gi) } });
        this.device.confirm(key, 0);
        await this.saveDevice();
      }
      const c = this.ensureConv(conv, !opts.server);
      this.owners.set(room, this.state.user);
      c.complete = true;
      this.state.current = key;
      await this.saveIndex();
    });
    this.onChange();
  }

  async part(key: string): Promise<void> {
    const c = this.state.convs.get(key);
    if (c === undefined || !("Room" in c.conv)) throw new Error("/part is for rooms");
    await this.request({ Part: { room: c.conv.Room } });
    this.device.forget(key);
    this.scheduleSave();
    this.state.convs.delete(key);
    this.state.order = this.state.order.filter((k) => k !== key);
    this.state.current = this.state.order[0];
    await this.saveIndex();
    this.onChange();
  }

  async invite(room: string, user: string): Promise<void> {
    await this.request({ Invite: { room, user } });
    const conv: Conv = { Room: room };
    await this.serial.run(async () => {
      if (this.device.has(convKey(conv))) await this.addDevices(conv, [user]);
    });
  }

  async openDirect(users: string[]): Promise<string> {
    const all = [...new Set([...users, this.state.user])].sort();
    const c = this.ensureConv({ Direct: all });
    this.state.current = c.key;
    await this.saveIndex();
    this.onChange();
    return c.key;
  }

  async who(room?: string): Promise<string> {
    const [, users] = await this.request({ Who: { room: room ?? null } });
    return (users as { user: string; online: boolean }[]).map((u) => `${u.user}${u.online ? "" : " (away)"}`).join(", ");
  }

  /** The conversation's members (a room's from `who`, with away and display names, and its
   * topic; a direct conversation's people). */
  async members(key: string): Promise<string[]> {
    const c = this.state.convs.get(key);
    if (c === undefined) return [];
    if (!("Room" in c.conv)) return c.conv.Direct;
    const [, users] = await this.request({ Who: { room: c.conv.Room } });
    const list = users as UserPresence[];
    for (const u of list) {
      if (u.away === null) this.away.delete(u.user);
      else this.away.set(u.user, u.away);
      if (u.display_name !== null) this.displayNames.set(u.user, u.display_name);
      if (u.online) this.online.add(u.user);
      else this.online.delete(u.user);
    }
    const [, rooms] = await this.request("Rooms");
    this.noteOwners(rooms as RoomInfo[]);
    const info = (rooms as RoomInfo[]).find((r) => r.room === (c.conv as { Room: string }).Room);
    if (info !== undefined && info.topic !== null && c.topic === undefined) c.topic = info.topic;
    return list.map((u) => u.user);
  }

  /** Room → owner (for `@room`, which counts only from the owner; "" for none). */
  owners = new Map<string, string>();

  private noteOwners(rooms: RoomInfo[]): void {
    for (const r of rooms) this.owners.set(r.room, r.owner ?? "");
  }

  /** Counts joins and parts seen (the members pane asks again when it moves). */
  membersChanged = 0;
  /** Who is online (as `who` and presence events told). */
  online = new Set<string>();
  /** Display names seen (user → name). */
  displayNames = new Map<string, string>();

  async rooms(): Promise<string> {
    const [, list] = await this.request("Rooms");
    return (list as { room: string; members: number; e2ee: boolean; member: boolean }[])
      .map((r) => `#${r.room} (${r.members} members, ${r.e2ee ? "end-to-end" : "server-encrypted"}${r.member ? ", joined" : ""})`)
      .join("; ");
  }

  async kick(room: string, user: string, reason?: string): Promise<void> {
    await this.request({ Kick: { room, user, reason: reason ?? null } });
  }

  async votekick(room: string, user: string): Promise<void> {
    await this.request({ VoteKick: { room, user } });
  }

  async devices(user: string): Promise<string> {
    const [, list] = await this.request({ E2eeDevices: { user } });
    const { keyFingerprint } = await import("./mls.js");
    const out: string[] = [];
    for (const d of list as { device: string; signature_key: number[] }[]) {
      out.push(`${d.device}: ${await keyFingerprint(bytesIn(d.signature_key))}`);
    }
    return out.length === 0 ? `${user} has no end-to-end device` : out.join("; ");
  }

  /** Searches what this account may see: the server searches the server-encrypted
   * conversations (it cannot read the others), and this device its own history of the
   * end-to-end ones, as the native client does. Newest first, at most MAX_SEARCH_RESULTS. */
  async search(query: string): Promise<Hit[]> {
    const words = queryWords(query);
    const hits: Hit[] = [];
    for (const c of this.state.convs.values()) {
      if (!c.e2ee) continue;
      for (const e of c.entries) {
        if (e.notice || e.deleted === true) continue;
        if (matchesQuery(e.file !== undefined ? `${e.text} ${e.file.name}` : e.text, words)) hits.push({ key: c.key, title: c.title, entry: e, local: true });
      }
    }
    const [, results] = await this.request({ Search: { query, room: null, limit: MAX_SEARCH_RESULTS, before: null } });
    for (const m of results as Message[]) {
      if (isMls(m.body.content_type)) continue;
      const shown = describe(m);
      if (shown.kind !== "line") continue;
      const key = convKey(m.conv);
      const title = this.state.convs.get(key)?.title ?? this.titleOf(m.conv);
      const entry: Entry = { seq: m.seq, from: m.from, ts: m.ts_ms, text: shown.text, msgId: m.msg_id };
      if (m.extra?.reply_to != null) entry.replyTo = m.extra.reply_to;
      hits.push({ key, title, entry, local: false });
    }
    hits.sort((a, b) => b.entry.ts - a.entry.ts || b.entry.seq - a.entry.seq);
    return hits.slice(0, MAX_SEARCH_RESULTS);
  }

  private titleOf(conv: Conv): string {
    return "Room" in conv ? `#${conv.Room}` : conv.Direct.filter((u) => u !== this.state.user).join(", ") || this.state.user;
  }

  // --- threads ----------------------------------------------------------------------------

  /** Threads of server-encrypted conversations as the server sent them: root id → lines. */
  private threads = new Map<string, Entry[]>();

  /** Loads a thread (a message and its replies): of a server-encrypted conversation from the
   * server (then kept up to date from what arrives), of an end-to-end one from this device's
   * own history (the server holds only ciphertext). */
  async loadThread(key: string, root: string): Promise<void> {
    const c = this.state.convs.get(key);
    if (c === undefined || this.isE2ee(key)) return;
    const got: Entry[] = [];
    let after: number | null = null;
    for (let page = 0; page < MAX_THREAD_PAGES; page++) {
      const [, msgs] = await this.request({ Thread: { msg_id: root, limit: THREAD_PAGE, after } });
      const list = msgs as Message[];
      for (const m of list) {
        const shown = describe(m);
        if (shown.kind !== "line" || got.some((g) => g.seq === m.seq)) continue;
        const reactions: Record<string, string[]> = {};
        for (const r of m.extra?.state?.reactions ?? []) reactions[r.emoji] = [...r.users];
        const e: Entry = { seq: m.seq, from: m.from, ts: m.ts_ms, text: shown.text, msgId: m.msg_id, reactions };
        if (m.extra?.state?.deleted === true) e.deleted = true;
        if (m.extra?.reply_to != null) e.replyTo = m.extra.reply_to;
        if (m.body.content_type.startsWith(CT_MARKDOWN)) e.markdown = true;
        got.push(e);
      }
      // The root comes with every page; a page without new replies is the end.
      const last = list.filter((m) => m.msg_id !== root && (after === null || m.seq > after)).at(-1);
      if (last === undefined) break;
      after = last.seq;
    }
    this.threads.delete(root);
    this.threads.set(root, got);
    while (this.threads.size > MAX_THREADS_KEPT) this.threads.delete(this.threads.keys().next().value as string);
    this.onChange();
  }

  /** A thread as shown: its first message (when known here) then its replies in order, in
   * their current state (what the timeline has, else what the server sent). */
  thread(key: string, root: string): { root: Entry | undefined; replies: Entry[] } {
    const c = this.state.convs.get(key);
    const bySeq = new Map<number, Entry>();
    for (const e of this.threads.get(root) ?? []) bySeq.set(e.seq, e);
    for (const e of c?.entries ?? []) if (!e.notice && (e.msgId === root || e.replyTo === root)) bySeq.set(e.seq, e);
    const all = [...bySeq.values()].sort((a, b) => a.seq - b.seq);
    return { root: all.find((e) => e.msgId === root), replies: all.filter((e) => e.msgId !== root) };
  }

  /** Sends an end-to-end file's description (name, size, hash, key) to the members. */
  async sendFileDescription(key: string, f: { fileId: string; name: string; size: number; sha256: Uint8Array; key: Uint8Array }): Promise<void> {
    const c = this.state.convs.get(key);
    if (c === undefined) throw new Error("no such conversation");
    const target: Target =
      "Room" in c.conv ? { Room: { room: c.conv.Room, except: [] } } : { Users: { to: c.conv.Direct.filter((u) => u !== this.state.user) } };
    const payload = encodePayload({ kind: "file", ...f });
    const idem = crypto.randomUUID();
    await this.serial.run(async () => {
      for (let attempt = 0; attempt < SEND_ATTEMPTS; attempt++) {
        const data = await this.device.encrypt(key, payload);
        await this.saveDevice();
        try {
          const s = await this.sendOnce({ Send: { target, body: { content_type: CT_APP, data: bytesOut(data) }, idempotency_key: idem, refs: null } });
          this.addEntry(c, { seq: s.seq, from: this.state.user, ts: s.ts_ms, text: `sent the file ${f.name} (${f.size} bytes)` }, false);
          await this.saveHistory(c);
          return;
        } catch (e) {
          if (!(e instanceof RequestError && e.code === "StaleEpoch")) throw e;
          await this.catchUp(c.conv);
        }
      }
      throw new Error("the conversation's group kept changing; the file was not described. Try again");
    });
    this.onChange();
  }

  /** Users away now (as events told): user → message. */
  away = new Map<string, string>();
  private typingSent = new Map<string, number>();
  private readSent = new Map<string, number>();

  /** Tells the conversation's members that this user is typing (at most once per
   * TYPING_INTERVAL_MS per conversation, as the server allows). */
  typing(key: string): void {
    const c = this.state.convs.get(key);
    if (c === undefined) return;
    const now = Date.now();
    if (now - (this.typingSent.get(key) ?? 0) < TYPING_INTERVAL_MS) return;
    this.typingSent.set(key, now);
    this.request({ Typing: { conv: this.convRef(c.conv) } }).catch(() => undefined);
  }

  /** Who is typing in a conversation now (besides this user). */
  typingNow(key: string): string[] {
    const c = this.state.convs.get(key);
    const now = Date.now();
    return [...(c?.typing ?? new Map<string, number>())].filter(([, until]) => until > now).map(([u]) => u);
  }

  /** Sends this user's read marker for what is shown of a conversation (when it moved), at
   * most once per READ_INTERVAL_MS per conversation (the server refuses faster ones): a
   * marker that comes too soon, or that failed, goes out when the interval is over. */
  sendRead(key: string): void {
    const c = this.state.convs.get(key);
    if (c === undefined || c.lastSeq <= (this.readSent.get(key) ?? 0) || this.readTimers.has(key)) return;
    const wait = (this.readSentAt.get(key) ?? 0) + READ_INTERVAL_MS - Date.now();
    if (wait > 0) {
      this.readTimers.set(
        key,
        setTimeout(() => {
          this.readTimers.delete(key);
          if (this.state.current === key && this.isVisible()) this.sendRead(key);
        }, wait),
      );
      return;
    }
    const seq = c.lastSeq;
    this.readSent.set(key, seq);
    this.readSentAt.set(key, Date.now());
    this.request({ Read: { conv: this.convRef(c.conv), seq } }).catch(() => {
      if (this.readSent.get(key) === seq) this.readSent.delete(key);
    });
  }

  private readSentAt = new Map<string, number>();
  private readTimers = new Map<string, ReturnType<typeof setTimeout>>();

  /** Who has read the line of sequence `seq` (besides its author and this user). */
  readBy(key: string, seq: number): string[] {
    const c = this.state.convs.get(key);
    return [...(c?.reads ?? new Map<string, number>())].filter(([u, s]) => s >= seq && u !== this.state.user).map(([u]) => u);
  }

  // --- new devices of this account ---------------------------------------------------------

  /** Devices of this account waiting for a decision (not this one). */
  waiting = new Map<string, WaitingDevice>();

  /** This device's HPKE key pair for history sent to it (private half in the sealed store). */
  private transferPrivate: Uint8Array | undefined;

  /** Tells the server about this device and learns which devices of the account wait. A new
   * device (no end-to-end history here yet), or one that asked before, asks the account's
   * other devices for history with its transfer key, signed by its own key, as a native new
   * device does at its start; the others show it with its safety number. */
  private async announceDevice(first: boolean): Promise<void> {
    let key = await this.store.getJson<{ pub: string; priv: string }>("transfer-key");
    const empty = ![...this.state.convs.values()].some((c) => c.e2ee && c.entries.some((e) => !e.notice));
    if (key === undefined && empty) {
      const kp = await this.device.hpkeKeyPair();
      key = { pub: toHex(kp.public), priv: toHex(kp.private) };
      await this.store.putJson("transfer-key", key);
    }
    let transferKey: Uint8Array = new Uint8Array();
    let signature: Uint8Array = new Uint8Array();
    const pub = key === undefined ? undefined : fromHex(key.pub);
    if (key !== undefined) this.transferPrivate = fromHex(key.priv);
    // Asked once per sign-in (a reconnect only asks for the list, so other devices are not
    // told again).
    if (first && key !== undefined && pub !== undefined) {
      transferKey = pub;
      signature = await this.device.signRaw(concat([TRANSFER_KEY_LABEL, pub]));
    }
    try {
      const [, list] = await this.request({ DeviceAnnounce: { transfer_key: bytesOut(transferKey), signature: bytesOut(signature) } });
      this.waiting.clear();
      for (const w of (list as WaitingDevice[]).slice(0, MAX_WAITING)) if (w.device !== this.device.device && w.state === "waiting") this.waiting.set(w.device, w);
    } catch {
      // An older server: no device approval there.
    }
  }

  /** Takes the history chunks another device of the account sent this one: checks each is
   * signed by a device of the account, opens it (HPKE, bound to this account, the two
   * devices, the transfer and its position), adds its rows to the local history (a row this
   * device read itself stays as it is), and acknowledges them, as the native client does. */
  private async takeHistory(): Promise<void> {
    const priv = this.transferPrivate;
    if (priv === undefined) return;
    let accountKeys: Set<string> | undefined;
    let after = 0;
    const counts = new Map<string, number>();
    for (let round = 0; round < MAX_FETCH_ROUNDS; round++) {
      const [, got] = await this.request({ TransferFetch: { after } }).catch(() => ["", []] as [string, unknown]);
      const chunks = got as { id: number; from_device: string; transfer: string; index: number; data: number[] }[];
      if (chunks.length === 0) return;
      if (accountKeys === undefined) {
        const [, devices] = await this.request({ E2eeDevices: { user: this.state.user } });
        accountKeys = new Set((devices as { signature_key: number[] }[]).map((d) => toHex(bytesIn(d.signature_key))));
      }
      const touched = new Set<ConvState>();
      for (const c of chunks) {
        after = Math.max(after, c.id);
        try {
          const aad = chunkAad(this.state.user, c.from_device, this.device.device, c.transfer, c.index);
          const sealed = decodeSealed(bytesIn(c.data));
          if (!accountKeys.has(toHex(sealed.signerKey))) throw new Error("it is not signed by a device of this account");
          if (!(await this.device.verifyRaw(sealed.signerKey, chunkSigned(aad, sealed.kemOutput, sealed.ciphertext), sealed.signature))) {
            throw new Error("its signature is wrong");
          }
          const chunk = decodeChunk(await this.device.hpkeOpen(priv, sealed.kemOutput, sealed.ciphertext, TRANSFER_INFO, aad));
          for (const r of chunk.rows) {
            const cs = this.importRow(r);
            if (cs !== undefined) touched.add(cs);
          }
          counts.set(c.transfer, (counts.get(c.transfer) ?? 0) + chunk.rows.length);
          if (chunk.last) {
            const { keyFingerprint } = await import("./mls.js");
            this.notice(
              undefined,
              `history received from your device ${c.from_device} (safety number ${await keyFingerprint(sealed.signerKey)}): ${chunk.messages} messages of ${chunk.conversations} conversations`,
            );
          }
        } catch (e) {
          this.notice(undefined, `a history chunk from your device ${c.from_device} was dropped: ${errText(e)}`);
        }
      }
      for (const cs of touched) await this.saveHistory(cs);
      if (touched.size > 0) await this.saveIndex();
      this.onChange();
      await this.request({ TransferAck: { through: after } });
    }
  }

  /** One row of another device's history as a line here; undefined when it is not one (or
   * this device has that line already). */
  private importRow(r: Row): ConvState | undefined {
    const conv: Conv | undefined = r.conv.startsWith("r:")
      ? { Room: r.conv.slice(2) }
      : r.conv.startsWith("d:")
        ? { Direct: r.conv.slice(2).split(",").filter((u) => u.length > 0) }
        : undefined;
    if (conv === undefined || convKey(conv) !== r.conv || !Number.isSafeInteger(r.seq) || r.seq <= 0) return undefined;
    const p = decodePayload(r.payload);
    let entry: Entry;
    if (p?.kind === "body") {
      entry = { seq: r.seq, from: r.sender, ts: r.tsMs, text: p.contentType === CT_DELETE ? "(deleted)" : bodyText(p.contentType, p.data, r.sender) };
      if (p.contentType === CT_DELETE) entry.deleted = true;
      if (p.contentType.startsWith(CT_MARKDOWN)) entry.markdown = true;
    } else if (p?.kind === "file") {
      entry = {
        seq: r.seq,
        from: r.sender,
        ts: r.tsMs,
        text: `offers the file ${p.name} (${p.size} bytes)`,
        file: { fileId: p.fileId, name: p.name, size: p.size, sha256: toHex(p.sha256), key: toHex(p.key) },
      };
    } else {
      return undefined;
    }
    if (r.state !== undefined) {
      const st = r.state.state;
      entry.msgId = r.state.msgId;
      if (st.replyTo !== undefined) entry.replyTo = st.replyTo;
      if ((st.edits > 0 || st.editedMs !== undefined) && !st.deleted) entry.edited = true;
      if (st.deleted) {
        entry.deleted = true;
        entry.text = "(deleted)";
        delete entry.file;
      }
      entry.reactions = Object.fromEntries(st.reactions.filter(([emoji, who]) => emoji.length > 0 && who.length > 0));
    }
    const c = this.ensureConv(conv, true);
    return this.addEntry(c, entry, false) ? c : undefined;
  }

  /** Rejects a device of this account: the server takes it out of the account for good (it
   * is sent no history and leaves the end-to-end groups). */
  async rejectDevice(device: string): Promise<void> {
    await this.request({ DeviceDecide: { device, approve: false } });
    this.waiting.delete(device);
    this.onChange();
  }

  /** Approves a device of this account and sends it this browser's end-to-end history, as a
   * native device does: its transfer key's signature by the device is checked first, then the
   * rows go in chunks sealed to that key (HPKE) and signed by this device. Returns what moved. */
  async approveDevice(device: string, progress: (done: number, total: number) => void = () => {}): Promise<{ conversations: number; messages: number }> {
    const [, list] = await this.request({ DeviceAnnounce: { transfer_key: [], signature: [] } });
    const w = (list as WaitingDevice[]).find((x) => x.device === device);
    if (w === undefined) throw new Error(`no device ${device} of yours is waiting for approval`);
    const transferKey = bytesIn(w.transfer_key);
    const signed = concat([TRANSFER_KEY_LABEL, transferKey]);
    if (transferKey.length === 0 || !(await this.device.verifyRaw(bytesIn(w.signature_key), signed, bytesIn(w.signature)))) {
      throw new Error(`device ${device}'s transfer key is not signed by its own key: it was not approved; ask it to sign in again`);
    }
    await this.request({ DeviceDecide: { device, approve: true } });
    this.waiting.delete(device);
    this.onChange();
    const rows = this.historyRows();
    const conversations = new Set(rows.map((r) => r.conv)).size;
    const transfer = toHex(crypto.getRandomValues(new Uint8Array(16)));
    const chunks = chunksOf(rows);
    let index = 0;
    let sent = 0;
    const put = async (rowsOf: Row[], last: boolean) => {
      const aad = chunkAad(this.state.user, this.device.device, device, transfer, index);
      const plain = encodeChunk({ rows: rowsOf, last, replaces: false, conversations, messages: last ? sent : rows.length });
      const sealed = await this.device.hpkeSeal(transferKey, TRANSFER_INFO, aad, plain);
      const signature = await this.device.signRaw(chunkSigned(aad, sealed.kemOutput, sealed.ciphertext));
      const data = encodeSealed({ ...sealed, signerKey: this.device.signaturePublicKey(), signature });
      for (let attempt = 1; ; attempt++) {
        try {
          await this.request({ TransferPut: { device, transfer, index, data: bytesOut(data) } });
          break;
        } catch (e) {
          if (attempt >= PUT_ATTEMPTS) throw e;
          await sleep(PUT_RETRY_MS);
        }
      }
      index++;
    };
    for (const c of chunks) {
      await put(c, false);
      sent += c.length;
      progress(sent, rows.length);
    }
    await put([], true);
    this.notice(undefined, `sent ${sent} messages of ${conversations} conversations to your device ${device}`);
    return { conversations, messages: sent };
  }

  /** This browser's end-to-end history as the native history store's rows (conversation,
   * sequence, sender, time, the payload's encoding, the message's state). */
  private historyRows(): Row[] {
    const rows: Row[] = [];
    for (const c of this.state.convs.values()) {
      if (!c.e2ee) continue;
      for (const e of c.entries) {
        if (e.notice || e.seq <= 0) continue;
        let payload: Payload;
        const sha = e.file?.sha256 !== undefined ? fromHex(e.file.sha256) : undefined;
        const fileKey = e.file?.key !== undefined ? fromHex(e.file.key) : undefined;
        if (e.file !== undefined && sha?.length === 32 && fileKey?.length === 32) {
          payload = { kind: "file", fileId: e.file.fileId, name: e.file.name, size: e.file.size, sha256: sha, key: fileKey };
        } else if (e.deleted === true) {
          payload = { kind: "body", contentType: CT_DELETE, data: new Uint8Array() };
        } else {
          // A `/me` line is shown as "* from text": it travels as the action it was.
          const me = `* ${e.from} `;
          const action = e.text.startsWith(me);
          const text = action ? e.text.slice(me.length) : e.text;
          const contentType = e.markdown === true ? (action ? CT_MARKDOWN_ACTION : CT_MARKDOWN) : action ? CT_ACTION : CT_TEXT;
          payload = { kind: "body", contentType, data: enc.encode(text) };
        }
        const state =
          e.msgId === undefined
            ? undefined
            : {
                msgId: e.msgId,
                state: {
                  replyTo: e.replyTo,
                  editedMs: e.edited === true ? e.ts : undefined,
                  edits: e.edited === true ? 1 : 0,
                  deleted: e.deleted === true,
                  reactions: Object.entries(e.reactions ?? {}).filter(([, who]) => who.length > 0),
                },
              };
        rows.push({ conv: c.key, seq: e.seq, sender: e.from, tsMs: e.ts, payload: encodePayload(payload), state });
      }
    }
    return rows;
  }

  async setTopic(room: string, topic: string): Promise<void> {
    await this.request({ SetTopic: { room, topic } });
    // The server tells the others; this connection shows it from the reply.
    const c = this.ensureConv({ Room: room });
    c.topic = topic;
    this.onChange();
  }

  /** This account's display name (`null` removes it), shown beside the account name. */
  async setDisplayName(name: string | null): Promise<void> {
    await this.request({ SetDisplayName: { name } });
    if (name === null) this.displayNames.delete(this.state.user);
    else this.displayNames.set(this.state.user, name);
    this.onChange();
  }

  /** Whether others see how far this account has read (kept by the server for the account). */
  async shareReads(share: boolean): Promise<void> {
    await this.request({ ShareReads: { share } });
  }

  async setAway(text: string | null): Promise<void> {
    await this.request({ Away: { text } });
  }

  async ban(user: string, reason?: string): Promise<void> {
    await this.request({ Ban: { user, ip: null, duration_s: null, reason: reason ?? null } });
  }

  async unban(user: string): Promise<void> {
    await this.request({ Unban: { user, ip: null } });
  }

  async announce(text: string): Promise<void> {
    await this.request({ Announce: { text } });
  }

  markRead(key: string): void {
    const c = this.state.convs.get(key);
    if (c === undefined) return;
    c.unread = 0;
    c.mentions = 0;
  }

  /** Raw request, for what the UI does directly (files). */
  call(req: Request): Promise<[string, unknown]> {
    return this.request(req);
  }

  isE2ee(key: string): boolean {
    return this.state.convs.get(key)?.e2ee === true && this.device.has(key);
  }
}

/** Logs in once on a connection of its own, to check the password; then closes it. */
async function verifyPassword(opts: LoginOptions): Promise<void> {
  const conn = new Connection(opts.url, () => {}, () => {});
  try {
    await conn.ready();
    await conn.request({ Login: { user: opts.user, password: opts.password, server_password: opts.serverPassword ?? null, resume: [] } });
  } finally {
    conn.shutdown();
  }
}

/** One tab of this browser speaks for the account's device at a time: two would fork its MLS
 * state. The lock is held until the tab closes. */
async function holdDeviceLock(user: string): Promise<() => void> {
  if (typeof navigator === "undefined" || navigator.locks === undefined) return () => {};
  let release = () => {};
  const held = new Promise<void>((r) => (release = r));
  const got = await new Promise<boolean>((resolve) => {
    void navigator.locks.request(`conclave-device/${user}`, { ifAvailable: true }, (lock) => {
      resolve(lock !== null);
      return lock === null ? undefined : held;
    });
  });
  if (!got) throw new Error(`${user} is signed in in another tab of this browser; use that tab (or close it first)`);
  return release;
}

function isMls(ct: string): boolean {
  return ct === CT_APP || ct === CT_COMMIT || ct === CT_PROPOSAL;
}

export function errText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

export { variant };
