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

/** The kinds of an end-to-end act (conclave-e2ee's `ACT_*`). */
export const ACT_EDIT = 1;
export const ACT_DELETE = 2;
export const ACT_REACT = 3;
export const ACT_UNREACT = 4;

/** The server-encrypted act kinds by their end-to-end codes (the cleartext reference of an
 * end-to-end act must name the same kind as its ciphertext). */
export const ACT_NAMES: Record<number, string> = { 1: "Edit", 2: "Delete", 3: "React", 4: "Unreact" };

/** What an act needs of a timeline line. */
export interface ActLine {
  from: string;
  text: string;
  msgId?: string;
  notice?: boolean;
  deleted?: boolean;
  /** Emoji → who reacted, in the order they first did. */
  reactions?: Record<string, string[]>;
  /** Bumped at every change, so the timeline renders the line again. */
  rev?: number;
}

/** Applies an act by `from` to the line `target` names; true when a line changed. An edit by
 * anyone but the line's author, or an act on a deleted or absent line, changes nothing (who may
 * delete is the server's check). `content`: the new text of an edit, the emoji of a reaction. */
export function applyAct(lines: ActLine[], target: string, kind: number, from: string, content: string): boolean {
  const line = lines.find((e) => e.notice !== true && e.msgId === target);
  if (line === undefined || line.deleted === true) return false;
  const changed = change(line, kind, from, content);
  if (changed) line.rev = (line.rev ?? 0) + 1;
  return changed;
}

function change(line: ActLine, kind: number, from: string, content: string): boolean {
  switch (kind) {
    case ACT_EDIT:
      if (line.from !== from || content === "") return false;
      line.text = `${content} (edited)`;
      return true;
    case ACT_DELETE:
      line.text = "(deleted)";
      line.deleted = true;
      delete line.reactions;
      return true;
    case ACT_REACT:
    case ACT_UNREACT: {
      const r = line.reactions ?? {};
      const who = r[content] ?? [];
      if (kind === ACT_REACT) {
        if (who.includes(from)) return false;
        r[content] = [...who, from];
      } else {
        if (!who.includes(from)) return false;
        const rest = who.filter((u) => u !== from);
        if (rest.length === 0) delete r[content];
        else r[content] = rest;
      }
      line.reactions = r;
      return true;
    }
    default:
      return false;
  }
}

/** A line's reactions as shown under it ("👍 2  🎉 1") and who made them ("👍 bob, carol"). */
export function reactionsShown(line: ActLine): { text: string; who: string } | undefined {
  const r = Object.entries(line.reactions ?? {}).filter(([, users]) => users.length > 0);
  if (r.length === 0) return undefined;
  return {
    text: r.map(([emoji, users]) => `${emoji} ${users.length}`).join("  "),
    who: r.map(([emoji, users]) => `${emoji} ${users.join(", ")}`).join("; "),
  };
}
