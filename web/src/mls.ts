// One browser device's MLS state (ts-mls, patched by scripts/patch-ts-mls.mjs), in the same
// settings as the native clients' OpenMLS (crates/conclave-e2ee): ciphersuite 0x0001, basic
// credentials `user/device`, handshake messages as public messages, padding, the ratchet tree
// in GroupInfo and Welcome, the server as the group's only external sender.
//
// Like conclave-e2ee's Device: a commit this device makes is *pending* until the server has
// ordered it (confirm) or refused it (discard); messages of a conversation are processed in
// the server's order, each at most once (by sequence number).

import {
  createApplicationMessage,
  createCommit,
  createGroup,
  createGroupInfoWithExternalPubAndRatchetTree,
  decodeGroupState,
  decodeMlsMessage,
  encodeExternalSenders,
  encodeGroupState,
  encodeMlsMessage,
  emptyPskIndex,
  generateKeyPackageWithKey,
  getCiphersuiteFromName,
  getCiphersuiteImpl,
  joinGroup,
  joinGroupExternal,
  processPrivateMessage,
  processPublicMessage,
  defaultLifetime,
  defaultLifetimeConfig,
  defaultKeyPackageEqualityConfig,
  defaultAuthenticationService,
  type CiphersuiteImpl,
  type ClientConfig,
  type ClientState,
  type KeyPackage,
  type PrivateKeyPackage,
  type Capabilities,
  type Proposal,
  type MLSMessage,
} from "ts-mls";
import { decodeKeyPackage, encodeKeyPackage } from "ts-mls/keyPackage.js";
import { getGroupMembers } from "ts-mls/clientState.js";
import { decodePrivateKeyPackage, encodePrivateKeyPackage } from "./mls-private.js";

/** The one ciphersuite Conclave uses (0x0001). */
export const CIPHERSUITE = "MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519" as const;
/** The identity the server signs its proposals with (conclave-e2ee's SERVER_IDENTITY). */
export const SERVER_IDENTITY = "conclave-server";
/** Past epochs whose keys a member keeps (conclave-e2ee's MAX_PAST_EPOCHS). */
export const MAX_PAST_EPOCHS = 5;
/** Out-of-order tolerance per sender (conclave-e2ee's OUT_OF_ORDER_TOLERANCE). */
export const OUT_OF_ORDER_TOLERANCE = 20;
/** How far ahead a message's generation may be (conclave-e2ee's MAX_FORWARD_DISTANCE). */
export const MAX_FORWARD_DISTANCE = 1000;
/** Application messages are padded to a multiple of this many bytes (conclave-e2ee's PADDING). */
export const PADDING = 256;
/** AES-128-GCM's tag, counted in the padded length as OpenMLS counts it. */
const AEAD_TAG_BYTES = 16;
/** At most this many unused key packages are kept (their private keys wait for a Welcome). */
export const MAX_KEPT_KEY_PACKAGES = 64;

const enc = new TextEncoder();
const dec = new TextDecoder();

export const clientConfig: ClientConfig = {
  keyRetentionConfig: {
    retainKeysForGenerations: OUT_OF_ORDER_TOLERANCE,
    retainKeysForEpochs: MAX_PAST_EPOCHS,
    maximumForwardRatchetSteps: MAX_FORWARD_DISTANCE,
  },
  lifetimeConfig: defaultLifetimeConfig,
  keyPackageEqualityConfig: defaultKeyPackageEqualityConfig,
  paddingConfig: { kind: "padToMultiple", multiple: PADDING, overhead: AEAD_TAG_BYTES },
  authService: defaultAuthenticationService,
};

const capabilities: Capabilities = {
  versions: ["mls10"],
  ciphersuites: [CIPHERSUITE],
  extensions: [],
  proposals: [],
  credentials: ["basic"],
};

let suite: Promise<CiphersuiteImpl> | undefined;
/** The ciphersuite's implementation (WebCrypto and noble), made once. */
export function cipherSuite(): Promise<CiphersuiteImpl> {
  suite ??= getCiphersuiteImpl(getCiphersuiteFromName(CIPHERSUITE));
  return suite;
}

/** The credential identity of one device: `user/device` (conclave-e2ee's `identity`). */
export function identity(user: string, device: string): Uint8Array {
  return enc.encode(`${user}/${device}`);
}

/** The (user, device) of a basic credential, or undefined when it is not one of ours. */
export function parseIdentity(id: Uint8Array): { user: string; device: string } | undefined {
  const text = dec.decode(id);
  const i = text.indexOf("/");
  if (i <= 0 || i === text.length - 1 || text.indexOf("/", i + 1) !== -1) return undefined;
  return { user: text.slice(0, i), device: text.slice(i + 1) };
}

/** What a device hands to the server for a commit it made. */
export interface Outgoing {
  commit: Uint8Array;
  welcome: Uint8Array | undefined;
  groupInfo: Uint8Array;
}

export interface Member {
  user: string;
  device: string;
  fingerprint: string;
}

/** What processing one message of a conversation's log did. */
export type Processed =
  | { kind: "duplicate" }
  | { kind: "not_member" }
  | { kind: "app"; user: string; device: string; plaintext: Uint8Array }
  | { kind: "commit"; epoch: bigint; added: Member[]; removed: Member[]; removedSelf: boolean }
  | { kind: "proposal" }
  | { kind: "unreadable"; reason: string };

interface Group {
  state: ClientState;
  lastSeq: number;
  joinedSeq: number;
  active: boolean;
  pending: { commit: Uint8Array; state: ClientState } | undefined;
}

function errText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= (a[i] ?? 0) ^ (b[i] ?? 0);
  return d === 0;
}

/** A short fingerprint of a signature key (conclave-e2ee's `key_fingerprint`). */
export async function keyFingerprint(key: Uint8Array): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", key as BufferSource));
  const hex = Array.from(digest.slice(0, 16), (b) => b.toString(16).padStart(2, "0")).join("");
  return [0, 8, 16, 24].map((i) => hex.slice(i, i + 8)).join(" ");
}

function parse(bytes: Uint8Array): MLSMessage {
  const m = decodeMlsMessage(bytes, 0);
  if (m === undefined) throw new Error("not a valid MLS message");
  return m[0];
}

/** Serialised form of a device (to seal into IndexedDB). */
export interface DeviceRecord {
  user: string;
  device: string;
  signPublic: Uint8Array;
  signKey: Uint8Array;
  keyPackages: { pub: Uint8Array; priv: Uint8Array }[];
  groups: { conv: string; state: Uint8Array; lastSeq: number; joinedSeq: number; active: boolean }[];
}

/** One device's end-to-end state. */
export class MlsDevice {
  private groups = new Map<string, Group>();
  private keyPackages: { pub: KeyPackage; priv: PrivateKeyPackage }[] = [];

  private constructor(
    readonly user: string,
    readonly device: string,
    private readonly sign: { publicKey: Uint8Array; signKey: Uint8Array },
    private readonly cs: CiphersuiteImpl,
  ) {}

  /** A new device of `user`: a fresh signature key and a random device id. */
  static async create(user: string): Promise<MlsDevice> {
    const cs = await cipherSuite();
    const sign = await cs.signature.keygen();
    const id = crypto.getRandomValues(new Uint8Array(8));
    const device = Array.from(id, (b) => b.toString(16).padStart(2, "0")).join("");
    return new MlsDevice(user, device, sign, cs);
  }

  static async restore(r: DeviceRecord): Promise<MlsDevice> {
    const cs = await cipherSuite();
    const d = new MlsDevice(r.user, r.device, { publicKey: r.signPublic, signKey: r.signKey }, cs);
    for (const kp of r.keyPackages) {
      const pub = decodeKeyPackage(kp.pub, 0);
      const priv = decodePrivateKeyPackage(kp.priv);
      if (pub !== undefined && priv !== undefined) d.keyPackages.push({ pub: pub[0], priv });
    }
    for (const g of r.groups) {
      const st = decodeGroupState(g.state, 0);
      if (st === undefined) continue;
      d.groups.set(g.conv, {
        state: { ...st[0], clientConfig },
        lastSeq: g.lastSeq,
        joinedSeq: g.joinedSeq,
        active: g.active,
        pending: undefined,
      });
    }
    return d;
  }

  record(): DeviceRecord {
    return {
      user: this.user,
      device: this.device,
      signPublic: this.sign.publicKey,
      signKey: this.sign.signKey,
      keyPackages: this.keyPackages.map((k) => ({
        pub: encodeKeyPackage(k.pub),
        priv: encodePrivateKeyPackage(k.priv),
      })),
      groups: [...this.groups].map(([conv, g]) => ({
        conv,
        state: encodeGroupState(g.state),
        lastSeq: g.lastSeq,
        joinedSeq: g.joinedSeq,
        active: g.active,
      })),
    };
  }

  signaturePublicKey(): Uint8Array {
    return this.sign.publicKey;
  }

  /** Signs `message` as it is with this device's signature key (Ed25519; no MLS label), as
   * the native device signs transfer keys and history chunks. */
  signRaw(message: Uint8Array): Promise<Uint8Array> {
    return this.cs.signature.sign(this.sign.signKey, message);
  }

  /** Whether `signature` is `publicKey`'s (Ed25519) signature over `message`. */
  verifyRaw(publicKey: Uint8Array, message: Uint8Array, signature: Uint8Array): Promise<boolean> {
    return this.cs.signature.verify(publicKey, message, signature).catch(() => false);
  }

  /** A new HPKE key pair of the ciphersuite (X25519): the raw public and private keys. */
  async hpkeKeyPair(): Promise<{ public: Uint8Array; private: Uint8Array }> {
    const kp = await this.cs.hpke.generateKeyPair();
    return { public: await this.cs.hpke.exportPublicKey(kp.publicKey), private: await this.cs.hpke.exportPrivateKey(kp.privateKey) };
  }

  /** HPKE single-shot base-mode open, the other side of `hpkeSeal`. */
  async hpkeOpen(privateKey: Uint8Array, kemOutput: Uint8Array, ciphertext: Uint8Array, info: Uint8Array, aad: Uint8Array): Promise<Uint8Array> {
    const sk = await this.cs.hpke.importPrivateKey(privateKey);
    return this.cs.hpke.open(sk, kemOutput, ciphertext, info, aad);
  }

  /** HPKE single-shot base-mode seal (RFC 9180) with the ciphersuite's configuration
   * (X25519, HKDF-SHA256, AES-128-GCM), as OpenMLS's `hpke_seal`. */
  async hpkeSeal(publicKey: Uint8Array, info: Uint8Array, aad: Uint8Array, plaintext: Uint8Array): Promise<{ kemOutput: Uint8Array; ciphertext: Uint8Array }> {
    const pk = await this.cs.hpke.importPublicKey(publicKey);
    const r = await this.cs.hpke.seal(pk, plaintext, info, aad);
    return { kemOutput: r.enc, ciphertext: r.ct };
  }

  fingerprint(): Promise<string> {
    return keyFingerprint(this.sign.publicKey);
  }

  /** `n` fresh key packages, whose private keys are kept for a Welcome. */
  async keyPackagesOut(n: number): Promise<Uint8Array[]> {
    const out: Uint8Array[] = [];
    for (let i = 0; i < n; i++) {
      const kp = await generateKeyPackageWithKey(
        { credentialType: "basic", identity: identity(this.user, this.device) },
        capabilities,
        defaultLifetime,
        [],
        this.sign,
        this.cs,
      );
      this.keyPackages.push({ pub: kp.publicPackage, priv: kp.privatePackage });
      // Bare KeyPackage structs (not MLS messages), as the native clients publish them.
      out.push(encodeKeyPackage(kp.publicPackage));
    }
    while (this.keyPackages.length > MAX_KEPT_KEY_PACKAGES) this.keyPackages.shift();
    return out;
  }

  has(conv: string): boolean {
    return this.groups.has(conv);
  }

  isActive(conv: string): boolean {
    return this.groups.get(conv)?.active === true;
  }

  confirmed(conv: string): boolean {
    const g = this.groups.get(conv);
    return g !== undefined && g.joinedSeq >= 0;
  }

  lastSeq(conv: string): number | undefined {
    return this.groups.get(conv)?.lastSeq;
  }

  epoch(conv: string): bigint {
    return this.group(conv).state.groupContext.epoch;
  }

  forget(conv: string): void {
    this.groups.delete(conv);
  }

  private group(conv: string): Group {
    const g = this.groups.get(conv);
    if (g === undefined) throw new Error("this device is not a member of that conversation's group");
    return g;
  }

  private async ownKeyPackage(): Promise<{ pub: KeyPackage; priv: PrivateKeyPackage }> {
    const kp = await generateKeyPackageWithKey(
      { credentialType: "basic", identity: identity(this.user, this.device) },
      capabilities,
      defaultLifetime,
      [],
      this.sign,
      this.cs,
    );
    return { pub: kp.publicPackage, priv: kp.privatePackage };
  }

  private async groupInfoOf(state: ClientState): Promise<Uint8Array> {
    const gi = await createGroupInfoWithExternalPubAndRatchetTree(state, [], this.cs);
    return encodeMlsMessage({ version: "mls10", wireformat: "mls_group_info", groupInfo: gi });
  }

  /** Creates the group of a new conversation with the server (key `serverKey`) as its only
   * external sender; returns the GroupInfo the server follows the group from. */
  async createGroup(conv: string, serverKey: Uint8Array): Promise<Uint8Array> {
    const kp = await this.ownKeyPackage();
    const gid = crypto.getRandomValues(new Uint8Array(16));
    const senders = encodeExternalSenders([
      { signaturePublicKey: serverKey, credential: { credentialType: "basic", identity: enc.encode(SERVER_IDENTITY) } },
    ]);
    const state = await createGroup(gid, kp.pub, kp.priv, [{ extensionType: "external_senders", extensionData: senders }], this.cs, clientConfig);
    this.groups.set(conv, { state, lastSeq: 0, joinedSeq: 0, active: true, pending: undefined });
    return this.groupInfoOf(state);
  }

  /** The conversation's current GroupInfo with ratchet tree and external key. */
  groupInfo(conv: string): Promise<Uint8Array> {
    return this.groupInfoOf(this.group(conv).state);
  }

  private async commit(conv: string, extraProposals: Proposal[]): Promise<Outgoing> {
    const g = this.group(conv);
    const r = await createCommit(
      { state: g.state, cipherSuite: this.cs },
      { wireAsPublicMessage: true, ratchetTreeExtension: true, extraProposals },
    );
    const commit = encodeMlsMessage(r.commit);
    g.pending = { commit, state: r.newState };
    return {
      commit,
      welcome: r.welcome === undefined ? undefined : encodeMlsMessage({ version: "mls10", wireformat: "mls_welcome", welcome: r.welcome }),
      groupInfo: await this.groupInfoOf(r.newState),
    };
  }

  /** A commit adding the devices of these key packages; the server's pending
   * removals are committed with it. */
  async addMembers(conv: string, keyPackages: Uint8Array[]): Promise<Outgoing> {
    const proposals: Proposal[] = keyPackages.map((b) => {
      const kp = decodeKeyPackage(b, 0);
      if (kp === undefined || kp[1] !== b.length) throw new Error("not a key package");
      return { proposalType: "add", add: { keyPackage: kp[0] } };
    });
    return this.commit(conv, proposals);
  }

  /** A commit of the proposals queued in the group (the server's removals), if any. */
  async commitPending(conv: string): Promise<Outgoing | undefined> {
    const g = this.group(conv);
    if (Object.keys(g.state.unappliedProposals).length === 0 || g.pending !== undefined) return undefined;
    return this.commit(conv, []);
  }

  hasPendingProposals(conv: string): boolean {
    const g = this.groups.get(conv);
    return g !== undefined && Object.keys(g.state.unappliedProposals).length > 0;
  }

  /** A commit refreshing only this device's keys. */
  selfUpdate(conv: string): Promise<Outgoing> {
    return this.commit(conv, []);
  }

  /** The server ordered this device's pending commit as `seq`: adopt it. */
  confirm(conv: string, seq: number): void {
    const g = this.group(conv);
    if (g.pending !== undefined) {
      g.state = g.pending.state;
      g.pending = undefined;
    }
    g.lastSeq = Math.max(g.lastSeq, seq);
    if (g.joinedSeq < 0) g.joinedSeq = seq;
  }

  /** The server refused this device's pending commit: drop it (a refused join leaves nothing). */
  discard(conv: string): void {
    const g = this.groups.get(conv);
    if (g === undefined) return;
    g.pending = undefined;
    if (g.joinedSeq < 0) this.groups.delete(conv);
  }

  /** Joins from a Welcome; `seq` is the commit that added this device. */
  async joinWelcome(conv: string, welcomeBytes: Uint8Array, seq: number): Promise<void> {
    const m = parse(welcomeBytes);
    if (m.wireformat !== "mls_welcome") throw new Error("not a Welcome");
    let last: unknown = new Error("no key package of this device matches the Welcome");
    for (const [i, kp] of this.keyPackages.entries()) {
      try {
        const state = await joinGroup(m.welcome, kp.pub, kp.priv, emptyPskIndex, this.cs, undefined, undefined, clientConfig);
        this.keyPackages.splice(i, 1);
        this.groups.set(conv, { state, lastSeq: seq, joinedSeq: seq, active: true, pending: undefined });
        return;
      } catch (e) {
        last = e;
      }
    }
    throw last instanceof Error ? last : new Error(String(last));
  }

  /** An external commit joining the group of this GroupInfo; confirm or discard it. */
  async joinExternal(conv: string, groupInfoBytes: Uint8Array): Promise<Outgoing> {
    const m = parse(groupInfoBytes);
    if (m.wireformat !== "mls_group_info") throw new Error("not a GroupInfo");
    const kp = await this.ownKeyPackage();
    const r = await joinGroupExternal(m.groupInfo, kp.pub, kp.priv, false, this.cs, undefined, clientConfig);
    const commit = encodeMlsMessage({ version: "mls10", wireformat: "mls_public_message", publicMessage: r.publicMessage });
    this.groups.set(conv, { state: r.newState, lastSeq: 0, joinedSeq: -1, active: true, pending: { commit, state: r.newState } });
    return { commit, welcome: undefined, groupInfo: await this.groupInfoOf(r.newState) };
  }

  /** Encrypts a plaintext (an encoded Payload) for the conversation's members. */
  async encrypt(conv: string, plaintext: Uint8Array): Promise<Uint8Array> {
    const g = this.group(conv);
    if (Object.keys(g.state.unappliedProposals).length > 0) {
      throw new Error("a removal is pending in this conversation; it must be committed first");
    }
    const r = await createApplicationMessage(g.state, plaintext, this.cs);
    g.state = r.newState;
    return encodeMlsMessage({ version: "mls10", wireformat: "mls_private_message", privateMessage: r.privateMessage });
  }

  async members(conv: string): Promise<Member[]> {
    return membersOf(this.group(conv).state);
  }

  /** Processes log entry `seq` from account `from`, in order; each entry at most once. */
  async process(conv: string, seq: number, from: string, data: Uint8Array): Promise<Processed> {
    const g = this.group(conv);
    if (seq <= g.lastSeq || (g.joinedSeq >= 0 && seq <= g.joinedSeq)) return { kind: "duplicate" };
    if (!g.active) {
      g.lastSeq = seq;
      return { kind: "not_member" };
    }
    try {
      const r = await this.processInner(g, from, data);
      g.lastSeq = seq;
      return r;
    } catch (e) {
      g.lastSeq = seq;
      return { kind: "unreadable", reason: errText(e) };
    }
  }

  private async processInner(g: Group, from: string, data: Uint8Array): Promise<Processed> {
    if (g.pending !== undefined && bytesEqual(g.pending.commit, data)) {
      const before = await membersOf(g.state);
      g.state = g.pending.state;
      g.pending = undefined;
      const after = await membersOf(g.state);
      return { kind: "commit", epoch: g.state.groupContext.epoch, ...diff(before, after), removedSelf: false };
    }
    const m = parse(data);
    if (m.wireformat === "mls_private_message") {
      const r = await processPrivateMessage(g.state, m.privateMessage, emptyPskIndex, this.cs);
      g.state = r.newState;
      if (r.kind !== "applicationMessage") throw new Error("handshake messages must be public messages");
      const cred = r.senderCredential;
      const who = cred !== undefined && cred.credentialType === "basic" ? parseIdentity(cred.identity) : undefined;
      if (who === undefined) throw new Error("a sender without identity");
      if (who.user !== from) throw new Error(`the server says ${from} sent it but it is signed by ${who.user}`);
      return { kind: "app", user: who.user, device: who.device, plaintext: r.message };
    }
    if (m.wireformat !== "mls_public_message") throw new Error("an unexpected kind of message");
    const pm = m.publicMessage;
    if (pm.content.epoch !== g.state.groupContext.epoch) throw new Error("the message is for another epoch of the group");
    if (pm.content.contentType === "proposal") {
      const fromServer = pm.content.sender.senderType === "external" && pm.content.sender.senderIndex === 0;
      if (!fromServer || pm.content.proposal.proposalType !== "remove") {
        throw new Error("only the server's removal proposals are accepted");
      }
      const r = await processPublicMessage(g.state, pm, emptyPskIndex, this.cs);
      g.state = r.newState;
      return { kind: "proposal" };
    }
    if (pm.content.contentType !== "commit") throw new Error("an unexpected kind of message");
    const before = await membersOf(g.state);
    const ownLeaf = g.state.privatePath.leafIndex;
    const r = await processPublicMessage(g.state, pm, emptyPskIndex, this.cs);
    g.pending = undefined;
    const own = r.newState.ratchetTree[ownLeaf * 2];
    const removedSelf =
      own === undefined ||
      own.nodeType !== "leaf" ||
      !bytesEqual(own.leaf.signaturePublicKey, this.sign.publicKey);
    if (removedSelf) {
      g.active = false;
      return { kind: "commit", epoch: r.newState.groupContext.epoch, added: [], removed: [], removedSelf: true };
    }
    g.state = r.newState;
    const after = await membersOf(g.state);
    return { kind: "commit", epoch: g.state.groupContext.epoch, ...diff(before, after), removedSelf: false };
  }
}

async function membersOf(state: ClientState): Promise<Member[]> {
  const out: Member[] = [];
  for (const leaf of getGroupMembers(state)) {
    if (leaf.credential.credentialType !== "basic") continue;
    const who = parseIdentity(leaf.credential.identity);
    if (who === undefined) continue;
    out.push({ ...who, fingerprint: await keyFingerprint(leaf.signaturePublicKey) });
  }
  return out;
}

function diff(before: Member[], after: Member[]): { added: Member[]; removed: Member[] } {
  const key = (m: Member) => `${m.user}/${m.device}/${m.fingerprint}`;
  const b = new Set(before.map(key));
  const a = new Set(after.map(key));
  return { added: after.filter((m) => !b.has(key(m))), removed: before.filter((m) => !a.has(key(m))) };
}
