// The browser's MLS layer (src/mls.ts on ts-mls) as a JSON-lines peer on stdin/stdout, for the
// Rust–Node interop test (crates/conclave-e2ee/tests/web_interop.rs). Each request names a
// device it holds; bytes travel as hex. Replies: {"ok":true,...} or {"error":"..."}.

import { createInterface } from "node:readline";
import { MlsDevice, type Outgoing } from "../src/mls.js";
import { decodePayload, textPayload } from "../src/payload.js";
import { fromHex, toHex } from "../src/bytes.js";

type Req = Record<string, unknown>;
const devices = new Map<string, MlsDevice>();

function s(r: Req, k: string): string {
  const v = r[k];
  if (typeof v !== "string") throw new Error(`field ${k} must be a string`);
  return v;
}
function n(r: Req, k: string): number {
  const v = r[k];
  if (typeof v !== "number") throw new Error(`field ${k} must be a number`);
  return v;
}
function b(r: Req, k: string): Uint8Array {
  const v = fromHex(s(r, k));
  if (v === undefined) throw new Error(`field ${k} must be hex`);
  return v;
}
function dev(r: Req): MlsDevice {
  const d = devices.get(s(r, "name"));
  if (d === undefined) throw new Error(`no device ${s(r, "name")}`);
  return d;
}
function out(o: Outgoing): Req {
  return { commit: toHex(o.commit), welcome: o.welcome === undefined ? null : toHex(o.welcome), group_info: toHex(o.groupInfo) };
}

async function handle(r: Req): Promise<Req> {
  switch (s(r, "op")) {
    case "new": {
      const d = await MlsDevice.create(s(r, "user"));
      devices.set(s(r, "name"), d);
      return { device: d.device, fingerprint: await d.fingerprint() };
    }
    case "reload": {
      // Through the serialised record, as the browser keeps it in IndexedDB.
      const d = await MlsDevice.restore(dev(r).record());
      devices.set(s(r, "name"), d);
      return {};
    }
    case "key_package":
      return { key_package: toHex((await dev(r).keyPackagesOut(1))[0] ?? new Uint8Array()) };
    case "create":
      return { group_info: toHex(await dev(r).createGroup(s(r, "conv"), b(r, "server_key"))) };
    case "group_info":
      return { group_info: toHex(await dev(r).groupInfo(s(r, "conv"))) };
    case "add":
      return out(await dev(r).addMembers(s(r, "conv"), [b(r, "key_package")]));
    case "self_update":
      return out(await dev(r).selfUpdate(s(r, "conv")));
    case "commit_pending": {
      const o = await dev(r).commitPending(s(r, "conv"));
      return o === undefined ? { none: true } : out(o);
    }
    case "confirm":
      dev(r).confirm(s(r, "conv"), n(r, "seq"));
      return {};
    case "welcome":
      await dev(r).joinWelcome(s(r, "conv"), b(r, "welcome"), n(r, "seq"));
      return {};
    case "external":
      return out(await dev(r).joinExternal(s(r, "conv"), b(r, "group_info")));
    case "encrypt":
      return { message: toHex(await dev(r).encrypt(s(r, "conv"), textPayload(s(r, "text")))) };
    case "members":
      return { members: (await dev(r).members(s(r, "conv"))).map((m) => `${m.user}/${m.device}`) };
    case "process": {
      const p = await dev(r).process(s(r, "conv"), n(r, "seq"), s(r, "from"), b(r, "data"));
      if (p.kind === "app") {
        const payload = decodePayload(p.plaintext);
        const text = payload?.kind === "body" ? new TextDecoder().decode(payload.data) : null;
        return { kind: "app", user: p.user, device: p.device, text };
      }
      if (p.kind === "commit") {
        return {
          kind: "commit",
          epoch: Number(p.epoch),
          added: p.added.map((m) => `${m.user}/${m.device}`),
          removed: p.removed.map((m) => `${m.user}/${m.device}`),
          removed_self: p.removedSelf,
        };
      }
      if (p.kind === "unreadable") return { kind: "unreadable", reason: p.reason };
      return { kind: p.kind };
    }
    default:
      throw new Error(`unknown op ${s(r, "op")}`);
  }
}

const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  if (line.trim() === "") continue;
  let reply: Req;
  try {
    reply = { ok: true, ...(await handle(JSON.parse(line) as Req)) };
  } catch (e) {
    reply = { error: e instanceof Error ? `${e.message}` : String(e) };
  }
  process.stdout.write(JSON.stringify(reply) + "\n");
}
