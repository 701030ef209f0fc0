// The composer's slash commands, as the terminal client takes them (docs/chat.md): parsing
// only (no I/O), so the grammar is tested without a browser.

export type Command =
  | { cmd: "say"; text: string }
  | { cmd: "join"; room: string; password?: string }
  | { cmd: "part"; room?: string }
  | { cmd: "create"; room: string; private: boolean; server: boolean; password?: string }
  | { cmd: "invite"; user: string; room?: string }
  | { cmd: "msg"; to: string[]; text: string }
  | { cmd: "query"; to: string[] }
  | { cmd: "except"; users: string[]; text: string }
  | { cmd: "who"; room?: string }
  | { cmd: "rooms" }
  | { cmd: "devices"; user?: string }
  | { cmd: "history"; count: number }
  | { cmd: "search"; query: string }
  | { cmd: "kick"; user: string; reason?: string }
  | { cmd: "votekick"; user: string }
  | { cmd: "file" }
  | { cmd: "theme" }
  | { cmd: "about" }
  | { cmd: "help" }
  | { cmd: "quit" }
  | { cmd: "me"; text: string }
  | { cmd: "md"; text: string }
  | { cmd: "reply"; text: string }
  | { cmd: "edit"; text: string }
  | { cmd: "delete" }
  | { cmd: "react"; emoji: string; on: boolean }
  | { cmd: "topic"; topic: string }
  | { cmd: "away"; text?: string }
  | { cmd: "back" }
  | { cmd: "ban"; user: string; reason?: string }
  | { cmd: "unban"; user: string }
  | { cmd: "announce"; text: string }
  | { cmd: "thread" }
  | { cmd: "approve" | "reject"; device: string }
  | { cmd: "name"; name?: string }
  | { cmd: "receipts"; on: boolean }
  | { cmd: "mute"; on: boolean }
  | { cmd: "error"; message: string };

export const HELP =
  "/join room [password] · /part [room] · /create room [private] [server] [password] · /invite user [room] · " +
  "/msg user[,user…] text · /query user[,user…] · /except user[,user…] text · /who [room] · /rooms · " +
  "/devices [user] · /history [count] · /search words · /kick user [reason] · /votekick user · /file · " +
  "/me text · /md text · /reply text · /edit text · /delete · /react emoji · /unreact emoji · /topic text · /away [text] · /back · " +
  "/thread · /approve device · /reject device · /name [display name] · /receipts on|off · /mute · /unmute · /ban user [reason] · /unban user · /announce text · /theme · /about · /quit";

/** Most messages `/history` loads at once (as the TUI). */
export const MAX_HISTORY_COUNT = 500;

function users(list: string | undefined): string[] {
  return (list ?? "").split(",").map((u) => u.trim()).filter((u) => u.length > 0);
}

/** The longest reaction, in bytes of UTF-8 (the server's default). */
export const MAX_EMOJI_BYTES = 32;

export function parseCommand(line: string): Command {
  if (!line.startsWith("/") || line.startsWith("//")) {
    return { cmd: "say", text: line.startsWith("//") ? line.slice(1) : line };
  }
  const [head = "", ...rest] = line.slice(1).split(/\s+/);
  const arg = (i: number) => rest[i];
  const tail = (i: number) => rest.slice(i).join(" ");
  const need = (ok: boolean, usage: string): Command | undefined => (ok ? undefined : { cmd: "error", message: `usage: ${usage}` });
  switch (head.toLowerCase()) {
    case "join":
      return need(arg(0) !== undefined, "/join room [password]") ?? { cmd: "join", room: (arg(0) ?? "").replace(/^#/, ""), password: arg(1) };
    case "part":
    case "leave":
      return { cmd: "part", room: arg(0)?.replace(/^#/, "") };
    case "create": {
      const r = need(arg(0) !== undefined, "/create room [private] [server] [password]");
      if (r) return r;
      let priv = false;
      let server = false;
      let password: string | undefined;
      for (const w of rest.slice(1)) {
        if (w === "private") priv = true;
        else if (w === "server") server = true;
        else password = w;
      }
      return { cmd: "create", room: (arg(0) ?? "").replace(/^#/, ""), private: priv, server, password };
    }
    case "invite":
      return need(arg(0) !== undefined, "/invite user [room]") ?? { cmd: "invite", user: arg(0) ?? "", room: arg(1)?.replace(/^#/, "") };
    case "msg":
      return need(arg(0) !== undefined && tail(1) !== "", "/msg user[,user…] text") ?? { cmd: "msg", to: users(arg(0)), text: tail(1) };
    case "query":
      return need(arg(0) !== undefined, "/query user[,user…]") ?? { cmd: "query", to: users(arg(0)) };
    case "except":
      return need(arg(0) !== undefined && tail(1) !== "", "/except user[,user…] text") ?? { cmd: "except", users: users(arg(0)), text: tail(1) };
    case "who":
      return { cmd: "who", room: arg(0)?.replace(/^#/, "") };
    case "rooms":
      return { cmd: "rooms" };
    case "devices":
      return { cmd: "devices", user: arg(0) };
    case "history": {
      const n = arg(0) === undefined ? 50 : Number(arg(0));
      if (!Number.isInteger(n) || n < 1) return { cmd: "error", message: "usage: /history [count]" };
      return { cmd: "history", count: Math.min(n, MAX_HISTORY_COUNT) };
    }
    case "search":
      return need(tail(0) !== "", "/search words") ?? { cmd: "search", query: tail(0) };
    case "kick":
      return need(arg(0) !== undefined, "/kick user [reason]") ?? { cmd: "kick", user: arg(0) ?? "", reason: tail(1) || undefined };
    case "votekick":
      return need(arg(0) !== undefined, "/votekick user") ?? { cmd: "votekick", user: arg(0) ?? "" };
    case "file":
      return { cmd: "file" };
    case "theme":
      return { cmd: "theme" };
    case "about":
      return { cmd: "about" };
    case "help":
      return { cmd: "help" };
    case "quit":
      return { cmd: "quit" };
    case "md":
      return need(tail(0) !== "", "/md text") ?? { cmd: "md", text: tail(0) };
    case "me":
      return need(tail(0) !== "", "/me text") ?? { cmd: "me", text: tail(0) };
    case "reply":
      return need(tail(0) !== "", "/reply text") ?? { cmd: "reply", text: tail(0) };
    case "edit":
      return need(tail(0) !== "", "/edit text") ?? { cmd: "edit", text: tail(0) };
    case "delete":
      return { cmd: "delete" };
    case "react":
    case "unreact": {
      const emoji = arg(0) ?? "";
      const r = need(emoji !== "" && rest.length === 1, `/${head.toLowerCase()} emoji`);
      if (r) return r;
      if (new TextEncoder().encode(emoji).length > MAX_EMOJI_BYTES) return { cmd: "error", message: `a reaction is at most ${MAX_EMOJI_BYTES} bytes` };
      return { cmd: "react", emoji, on: head.toLowerCase() === "react" };
    }
    case "topic":
      return { cmd: "topic", topic: tail(0) };
    case "away":
      return { cmd: "away", text: tail(0) || undefined };
    case "back":
      return { cmd: "back" };
    case "ban":
      return need(arg(0) !== undefined, "/ban user [reason]") ?? { cmd: "ban", user: arg(0) ?? "", reason: tail(1) || undefined };
    case "unban":
      return need(arg(0) !== undefined, "/unban user") ?? { cmd: "unban", user: arg(0) ?? "" };
    case "thread":
      return { cmd: "thread" };
    case "approve":
    case "reject":
      return need(arg(0) !== undefined, `/${head.toLowerCase()} device`) ?? { cmd: head.toLowerCase() as "approve" | "reject", device: arg(0) ?? "" };
    case "name":
      return { cmd: "name", name: tail(0) || undefined };
    case "receipts": {
      const v = (arg(0) ?? "").toLowerCase();
      return v === "on" || v === "off" ? { cmd: "receipts", on: v === "on" } : { cmd: "error", message: "usage: /receipts on|off" };
    }
    case "mute":
    case "unmute":
      return { cmd: "mute", on: head.toLowerCase() === "mute" };
    case "announce":
      return need(tail(0) !== "", "/announce text") ?? { cmd: "announce", text: tail(0) };
    default:
      return { cmd: "error", message: `unknown command /${head}; /help lists them` };
  }
}
