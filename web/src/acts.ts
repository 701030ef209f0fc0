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
  | { kind: "reaction"; target: string };

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
        return { kind: "reaction", target: act.msg_id };
    }
  }
  if (m.extra?.state?.deleted === true) return { kind: "line", text: "(deleted)" };
  let text = bodyText(m.body.content_type, data, m.from);
  if (m.extra?.state?.edited_ms != null) text += " (edited)";
  return { kind: "line", text };
}
