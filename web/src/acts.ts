// How a server-encrypted message of the everyday-chat layer (crates/conclave-proto/src/chat.rs)
// shows in the timeline: a line of its own, or an act (edit, delete, reaction) on another
// message. Pure, so the unit tests pin it.

import type { Message } from "./protocol.js";

export const CT_MARKDOWN = "text/markdown";
export const CT_ACTION = "text/plain; action";
export const CT_MARKDOWN_ACTION = "text/markdown; action";
export const CT_DELETE = "application/vnd.conclave.delete";

export type Shown =
  | { kind: "line"; text: string }
  | { kind: "edit"; target: string; text: string }
  | { kind: "delete"; target: string }
  | { kind: "reaction"; target: string; emoji: string; on: boolean };

/** Payload::Act's kind codes (crates/conclave-e2ee/src/payload.rs). */
export const ACT_EDIT = 1;
export const ACT_DELETE = 2;
export const ACT_REACT = 3;
export const ACT_UNREACT = 4;
/** The longest reaction shown or sent, in bytes of UTF-8 (the server's default limit). */
export const MAX_EMOJI_BYTES = 32;

/** What an act changes on a timeline line. */
export interface Actable {
  text: string;
  from: string;
  edited?: boolean;
  deleted?: boolean;
  /** Emoji → who reacted with it. */
  reactions?: Record<string, string[]>;
  /** The message it answers. */
  replyTo?: string;
}

/** The kind of act a Payload::Act names and the cleartext reference the server checked; an
 * act whose two disagree is dropped (the server cannot point an edit at another message). */
export function actKindName(code: number): "Edit" | "Delete" | "React" | "Unreact" | undefined {
  return code === ACT_EDIT ? "Edit" : code === ACT_DELETE ? "Delete" : code === ACT_REACT ? "React" : code === ACT_UNREACT ? "Unreact" : undefined;
}

/** What an end-to-end Payload::Act does, or undefined when it is malformed or its cleartext
 * reference (`named`) does not match it. */
export function describeAct(
  p: { msgId: string; act: number; contentType: string; data: Uint8Array },
  named: { msg_id: string; kind: string } | null | undefined,
  from: string,
): Shown | undefined {
  const kind = actKindName(p.act);
  if (kind === undefined || named == null || named.msg_id !== p.msgId || named.kind !== kind) return undefined;
  switch (kind) {
    case "Edit":
      return { kind: "edit", target: p.msgId, text: bodyText(p.contentType, p.data, from) };
    case "Delete":
      return { kind: "delete", target: p.msgId };
    default: {
      if (p.data.length === 0 || p.data.length > MAX_EMOJI_BYTES) return undefined;
      return { kind: "reaction", target: p.msgId, emoji: dec.decode(p.data), on: kind === "React" };
    }
  }
}

/** A copy of `e` with the act applied (a new object, so the timeline redraws the row). */
export function applyShown<T extends Actable>(e: T, shown: Shown, by: string): T {
  const out: T = { ...e, reactions: { ...(e.reactions ?? {}) } };
  if (shown.kind === "edit") {
    if (by !== e.from || e.deleted === true) return e;
    out.text = shown.text;
    out.edited = true;
  } else if (shown.kind === "delete") {
    out.text = "(deleted)";
    out.deleted = true;
    out.reactions = {};
    delete out.replyTo;
  } else if (shown.kind === "reaction") {
    const r = out.reactions ?? {};
    const who = (r[shown.emoji] ?? []).filter((u) => u !== by);
    if (shown.on) who.push(by);
    if (who.length > 0) r[shown.emoji] = who;
    else delete r[shown.emoji];
    out.reactions = r;
  }
  return out;
}

const dec = new TextDecoder();

/** The text of a text body (plain, Markdown, or a `/me` action shown as "* from text"), or a
 * placeholder naming a content type this client does not show. */
export function bodyText(contentType: string, data: Uint8Array, from: string): string {
  switch (contentType) {
    case "text/plain":
    case CT_MARKDOWN:
      return dec.decode(data);
    case CT_ACTION:
    case CT_MARKDOWN_ACTION:
      return `* ${from} ${dec.decode(data)}`;
    default:
      return `[${contentType}, ${data.length} bytes]`;
  }
}

/** What a stored or live message of a server-encrypted conversation does to the timeline. */
export function describe(m: Message): Shown {
  const act = m.extra?.acts_on ?? null;
  const data = Uint8Array.from(m.body.data);
  if (act !== null) {
    switch (act.kind) {
      case "Edit":
        return { kind: "edit", target: act.msg_id, text: bodyText(m.body.content_type, data, m.from) };
      case "Delete":
        return { kind: "delete", target: act.msg_id };
      default:
        return { kind: "reaction", target: act.msg_id, emoji: dec.decode(data), on: act.kind === "React" };
    }
  }
  if (m.extra?.state?.deleted === true) return { kind: "line", text: "(deleted)" };
  let text = bodyText(m.body.content_type, data, m.from);
  if (m.extra?.state?.edited_ms != null) text += " (edited)";
  return { kind: "line", text };
}
