// The page: the sign-in form, then the conversation list (a navigation landmark "Rooms"), the
// timeline (role `log`, rendering only the rows in view) and the composer (a text box
// "Message" that takes the terminal client's slash commands). Built with the DOM API only (no
// inline script or style: the page runs under `default-src 'self'`).

import { Session, errText, type ConvState, type Entry, type Hit } from "./session.js";
import { HELP, parseCommand } from "./commands.js";
import { Timeline } from "./timeline.js";
import { sendFile, saveFile } from "./files.js";
import { renderMarkdown } from "./markdown.js";
import { keyFingerprint } from "./mls.js";

function keyFingerprintOf(key: number[]): Promise<string> {
  return keyFingerprint(Uint8Array.from(key));
}

/** Reactions offered by a line's "React" button. */
export const QUICK_REACTIONS = ["👍", "❤️", "😂", "🎉", "👀"];
/** Characters of the original shown above a reply. */
export const REPLY_QUOTE_CHARS = 60;

/** History pages loaded at most to reach a search result (as the terminal client). */
export const MAX_REVEAL_PAGES = 20;

/** What the composer's next line does to a line chosen with its buttons. */
type Pending = { kind: "reply" | "edit"; key: string; msgId: string } | undefined;

type Attrs = Record<string, string>;

function h(tag: string, attrs: Attrs = {}, ...children: (Node | string)[]): HTMLElement {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const c of children) el.append(c);
  return el;
}

const THEME_KEY = "conclave-theme";

function applyTheme(theme: string | null): void {
  if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
}

function toggleTheme(): void {
  const dark =
    document.documentElement.dataset.theme === "dark" ||
    (document.documentElement.dataset.theme === undefined && matchMedia("(prefers-color-scheme: dark)").matches);
  const next = dark ? "light" : "dark";
  localStorage.setItem(THEME_KEY, next);
  applyTheme(next);
}

export function startApp(root: HTMLElement | null): void {
  if (root === null) return;
  applyTheme(localStorage.getItem(THEME_KEY));
  showSignIn(root);
}

function wsUrl(): string {
  return `${location.protocol === "http:" ? "ws" : "wss"}://${location.host}/ws`;
}

function showSignIn(root: HTMLElement, message = ""): void {
  const user = h("input", { id: "user", name: "user", autocomplete: "username", required: "", autocapitalize: "none", spellcheck: "false" }) as HTMLInputElement;
  const password = h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: "" }) as HTMLInputElement;
  const serverPassword = h("input", { id: "server-password", type: "password", autocomplete: "off" }) as HTMLInputElement;
  const invite = h("input", { id: "invite", autocomplete: "off" }) as HTMLInputElement;
  const error = h("p", { class: "error", role: "alert" }, message);
  const signIn = h("button", { type: "submit" }, "Sign in") as HTMLButtonElement;
  const create = h("button", { type: "button", class: "secondary" }, "Create account") as HTMLButtonElement;
  const form = h(
    "form",
    { class: "signin", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Conclave"),
    h("label", { for: "user" }, "User name"),
    user,
    h("label", { for: "password" }, "Password"),
    password,
    h(
      "details",
      {},
      h("summary", {}, "More options"),
      h("label", { for: "server-password" }, "Server password"),
      serverPassword,
      h("label", { for: "invite" }, "Invite code"),
      invite,
    ),
    error,
    h("div", { class: "buttons" }, signIn, create),
  ) as HTMLFormElement;
  root.replaceChildren(h("main", { class: "signin-page" }, form));
  user.focus();

  const go = async (register: boolean) => {
    if (user.value.trim() === "" || password.value === "") {
      error.textContent = "Enter a user name and a password.";
      return;
    }
    signIn.disabled = create.disabled = true;
    error.textContent = register ? "Creating the account…" : "Signing in…";
    if ("Notification" in window && Notification.permission === "default") void Notification.requestPermission();
    try {
      const session = await Session.start({
        url: wsUrl(),
        user: user.value.trim(),
        password: password.value,
        register,
        serverPassword: serverPassword.value || undefined,
        inviteCode: invite.value || undefined,
      });
      showMain(root, session);
    } catch (e) {
      error.textContent = errText(e);
      signIn.disabled = create.disabled = false;
    }
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    void go(false);
  });
  create.addEventListener("click", () => void go(true));
}

function showMain(root: HTMLElement, s: Session): void {
  const nav = h("nav", { "aria-label": "Rooms", class: "convs" });
  const navList = h("ul", {});
  nav.append(h("h2", { class: "visually-hidden" }, "Conversations"), navList);
  const title = h("h2", { id: "conv-title" });
  const marker = h("span", { class: "marker", id: "marker" });
  const status = h("p", { class: "status", role: "status" });
  const aboutButton = h("button", { type: "button", class: "secondary" }, "About");
  const searchButton = h("button", { type: "button", class: "secondary", "aria-controls": "search-pane" }, "Search");
  const themeButton = h("button", { type: "button", class: "secondary" }, "Theme");
  const menuButton = h("button", { type: "button", class: "secondary menu", "aria-controls": "convs", "aria-expanded": "false" }, "Conversations");
  const topic = h("p", { class: "topic", id: "conv-topic" });
  const header = h("header", {}, menuButton, title, marker, topic, status, searchButton, themeButton, aboutButton);
  const typingLine = h("p", { class: "typing", "aria-live": "polite", id: "typing" });
  const readLine = h("p", { class: "readby", id: "read-by" });
  const pendingLine = h("p", { class: "pending", id: "pending" });
  const members = h("ul", {});
  const membersPane = h("aside", { "aria-label": "Members", class: "members" }, h("h2", {}, "Members"), members);

  // The search pane: the server searches server-encrypted conversations, this device its own
  // history of the end-to-end ones; a result opens its conversation at that line.
  const searchBox = h("input", { type: "search", "aria-label": "Search messages", id: "search-box", autocomplete: "off", enterkeyhint: "search" }) as HTMLInputElement;
  const searchForm = h("form", { role: "search", class: "search-form" }, searchBox, h("button", { type: "submit" }, "Find")) as HTMLFormElement;
  const searchStatus = h("p", { role: "status", class: "pane-status", id: "search-status" });
  const searchList = h("ul", { class: "hits", "aria-label": "Search results" });
  const closeSearch = h("button", { type: "button", class: "secondary" }, "Close search");
  const searchPane = h("aside", { "aria-label": "Search", class: "pane", id: "search-pane", hidden: "" },
    h("div", { class: "pane-head" }, h("h2", {}, "Search"), closeSearch), searchForm, searchStatus, searchList);

  // The thread pane: a message and its replies in order, live; what is typed there answers it.
  const threadTitle = h("p", { class: "pane-status", id: "thread-title" });
  const threadRoot = h("div", { class: "thread-root" });
  const threadList = h("ol", { class: "thread-replies", "aria-label": "Replies" });
  const threadBox = h("textarea", { "aria-label": "Reply in thread", rows: "2", placeholder: "Reply in the thread" }) as HTMLTextAreaElement;
  const threadForm = h("form", { class: "thread-form" }, threadBox, h("button", { type: "submit" }, "Reply")) as HTMLFormElement;
  const closeThread = h("button", { type: "button", class: "secondary" }, "Close thread");
  const threadPane = h("aside", { "aria-label": "Thread", class: "pane", id: "thread-pane", hidden: "" },
    h("div", { class: "pane-head" }, h("h2", {}, "Thread"), closeThread), threadTitle, threadRoot, threadList, threadForm);
  let thread: { key: string; root: string } | undefined;
  let pending: Pending;
  let membersOf = "";
  let membersSeen = 0;
  const log = h("div", { role: "log", "aria-label": "Messages", "aria-live": "polite", class: "timeline", tabindex: "0" });
  const composer = h("textarea", { "aria-label": "Message", rows: "1", placeholder: "Message, or /help" }) as HTMLTextAreaElement;
  const fileInput = h("input", { type: "file", id: "file", class: "visually-hidden" }) as HTMLInputElement;
  const fileLabel = h("label", { for: "file", class: "button secondary" }, "Attach a file");
  const sendButton = h("button", { type: "submit" }, "Send");
  const progress = h("progress", { max: "1", value: "0", hidden: "", "aria-label": "File transfer" }) as HTMLProgressElement;
  const form = h("form", { class: "composer" }, composer, fileLabel, fileInput, sendButton, progress) as HTMLFormElement;
  const aboutDialog = h("dialog", { "aria-labelledby": "about-title" }) as HTMLDialogElement;
  nav.id = "convs";
  // New devices of this account asking for its end-to-end history: approve (it is sent this
  // browser's history, sealed to it) or reject (it is taken out of the account).
  const devicesBox = h("section", { "aria-label": "Devices waiting", class: "devices", id: "devices-waiting", hidden: "" });
  header.append(devicesBox);
  const mainArea = h("main", { class: "conv" }, header, log, typingLine, readLine, pendingLine, form);
  const side = h("div", { class: "side" }, membersPane, searchPane, threadPane);

  const decideDevice = async (device: string, approve: boolean) => {
    if (!approve) {
      await s.rejectDevice(device);
      return s.notice(undefined, `rejected your device ${device}: it is out of your account`);
    }
    progress.hidden = false;
    try {
      await s.approveDevice(device, (done, total) => {
        progress.max = Math.max(total, 1);
        progress.value = done;
      });
    } finally {
      progress.hidden = true;
    }
  };
  let devicesShown = "";
  const drawDevices = () => {
    const list = [...s.waiting.values()];
    const sig = list.map((w) => w.device).join(",");
    if (sig === devicesShown) return;
    devicesShown = sig;
    devicesBox.hidden = list.length === 0;
    devicesBox.replaceChildren(
      ...list.map((w) => {
        const number = h("code", { class: "safety" }, "…");
        void keyFingerprintOf(w.signature_key).then((f) => (number.textContent = f));
        const approve = h("button", { type: "button" }, `Approve ${w.device}`);
        const reject = h("button", { type: "button", class: "secondary" }, `Reject ${w.device}`);
        approve.addEventListener("click", () => void decideDevice(w.device, true).catch((err: unknown) => s.notice(undefined, `the device was not approved: ${errText(err)}`)));
        reject.addEventListener("click", () => void decideDevice(w.device, false).catch((err: unknown) => s.notice(undefined, `the device was not rejected: ${errText(err)}`)));
        return h(
          "div",
          { class: "device-waiting" },
          h("p", {}, `A new device of yours asks for your end-to-end history: device ${w.device}`, w.addr ? ` from ${w.addr}` : "", `, since ${new Date(w.since_ms).toLocaleString()}. Its safety number is `, number, ". Approve it only if that device shows the same number."),
          approve,
          " ",
          reject,
        );
      }),
    );
  };
  root.replaceChildren(h("div", { class: "layout" }, nav, mainArea, side), aboutDialog);

  /** Shows one of the right-hand panes (the members pane when none). */
  const showPane = (which: "members" | "search" | "thread") => {
    membersPane.hidden = which !== "members";
    searchPane.hidden = which !== "search";
    threadPane.hidden = which !== "thread";
    side.classList.toggle("open", which !== "members");
    if (which !== "thread") thread = undefined;
  };
  const runSearch = async (query: string) => {
    showPane("search");
    searchBox.value = query;
    if (query.trim() === "") return;
    searchStatus.textContent = "Searching…";
    searchList.replaceChildren();
    const hits = await s.search(query);
    searchStatus.textContent = hits.length === 0 ? `Nothing found for “${query}”.` : `${hits.length} result${hits.length === 1 ? "" : "s"} for “${query}”, newest first`;
    searchList.replaceChildren(...hits.map((hit) => h("li", {}, hitButton(hit))));
  };
  const hitButton = (hit: Hit) => {
    const e = hit.entry;
    const when = new Date(e.ts);
    const b = h(
      "button",
      { type: "button", class: "secondary hit" },
      h("span", { class: "hit-where" }, `${hit.title} · ${e.from} · `, h("time", { datetime: when.toISOString() }, when.toLocaleString([], { dateStyle: "short", timeStyle: "short" }))),
      h("span", { class: "hit-text" }, e.text),
      ...(hit.local ? [h("span", { class: "hit-local" }, "from this device's history")] : []),
    );
    b.addEventListener("click", () => {
      // On a phone's width the pane covers the timeline: it steps aside for the result.
      if (matchMedia("(max-width: 700px)").matches) showPane("members");
      void reveal(hit.key, e.seq).catch((err: unknown) => s.notice(hit.key, errText(err)));
    });
    return b;
  };
  /** Opens a conversation at the line of sequence `seq`, loading older history as needed. */
  const reveal = async (key: string, seq: number) => {
    s.state.current = key;
    s.markRead(key);
    render();
    const find = () => s.state.convs.get(key)?.entries.find((x) => !x.notice && x.seq === seq);
    for (let page = 0; page < MAX_REVEAL_PAGES && find() === undefined; page++) {
      const c = s.state.convs.get(key);
      if (c === undefined || c.complete || s.isE2ee(key)) break;
      await s.loadHistory(key);
    }
    const e = find();
    if (e === undefined) return s.notice(key, "that message is no longer in reach of this conversation's history");
    timeline.reveal(e);
  };
  const openThread = (key: string, e: Entry) => {
    // A reply's thread is the one it is in.
    const root = e.replyTo ?? e.msgId;
    if (root === undefined) return;
    thread = { key, root };
    showPane("thread");
    drawThread();
    threadBox.focus();
    void s.loadThread(key, root).catch((err: unknown) => s.notice(key, `the thread could not be loaded: ${errText(err)}`));
  };
  const drawThread = () => {
    if (thread === undefined) return;
    const t = s.thread(thread.key, thread.root);
    const first = t.root;
    threadTitle.textContent = `${first === undefined ? "an earlier message" : `${first.from}: ${first.text.slice(0, REPLY_QUOTE_CHARS)}`} · ${t.replies.length} repl${t.replies.length === 1 ? "y" : "ies"}`;
    threadRoot.replaceChildren(first === undefined ? h("p", { class: "row notice" }, "The first message is not on this device.") : threadRow(first, s));
    threadList.replaceChildren(...t.replies.map((r) => h("li", {}, threadRow(r, s))));
  };

  const choose = (kind: "reply" | "edit", e: Entry) => {
    const key = s.state.current;
    if (key === undefined || e.msgId === undefined) return;
    pending = { kind, key, msgId: e.msgId };
    if (kind === "edit") composer.value = e.text;
    pendingLine.textContent = `${kind === "reply" ? "Replying to" : "Editing"} ${e.from}: ${e.text.slice(0, REPLY_QUOTE_CHARS)} (Escape cancels)`;
    composer.focus();
  };
  const actions: RowActions = {
    reply: (e) => choose("reply", e),
    edit: (e) => choose("edit", e),
    del: (e) => {
      const key = s.state.current;
      if (key !== undefined && e.msgId !== undefined) s.act(key, e.msgId, { kind: "Delete" }).catch((err: unknown) => s.notice(key, errText(err)));
    },
    react: (e, emoji) => {
      const key = s.state.current;
      if (key === undefined || e.msgId === undefined) return;
      const mine = (e.reactions?.[emoji] ?? []).includes(s.state.user);
      s.act(key, e.msgId, { kind: mine ? "Unreact" : "React", emoji }).catch((err: unknown) => s.notice(key, errText(err)));
    },
    thread: (e) => {
      const key = s.state.current;
      if (key !== undefined) openThread(key, e);
    },
    quote: (e) => {
      const c = s.state.current ? s.state.convs.get(s.state.current) : undefined;
      return c?.entries.find((x) => !x.notice && x.msgId === e.replyTo);
    },
  };

  const timeline = new Timeline(log, (e) => renderEntry(e, s, progress, actions), () => {
    const key = s.state.current;
    if (key !== undefined && !s.isE2ee(key)) void s.loadHistory(key).catch(() => undefined);
  });

  const render = () => {
    const st = s.state;
    let totalUnread = 0;
    const items: HTMLElement[] = [];
    for (const key of st.order) {
      const c = st.convs.get(key);
      if (c === undefined) continue;
      if (c.muted !== true) totalUnread += c.unread;
      const badge = c.unread > 0 ? h("span", { class: "badge", "aria-hidden": "true" }, String(c.unread)) : "";
      const counts = c.unread > 0 ? `${c.unread} unread${c.mentions > 0 ? `, ${c.mentions} mentions` : ""}` : "";
      const desc = h("span", { class: "visually-hidden", id: `unread-${idOf(key)}` }, c.muted === true ? `muted${counts ? `, ${counts}` : ""}` : counts);
      const b = h("button", { type: "button", class: key === st.current ? "current" : "", "aria-describedby": `unread-${idOf(key)}` }, c.title);
      if (key === st.current) b.setAttribute("aria-current", "page");
      b.addEventListener("click", () => {
        st.current = key;
        s.markRead(key);
        nav.classList.remove("open");
        render();
        composer.focus();
      });
      const mentionBadge = c.mentions > 0 ? h("span", { class: "badge mention", "aria-hidden": "true", title: "mentions of you" }, `@${c.mentions}`) : "";
      const mutedMark = c.muted === true ? h("span", { class: "muted-mark", "aria-hidden": "true", title: "muted" }, "(muted)") : "";
      items.push(h("li", {}, b, badge, mentionBadge, mutedMark, desc));
    }
    navList.replaceChildren(...items);
    document.title = totalUnread > 0 ? `(${totalUnread}) Conclave` : "Conclave";
    status.textContent = st.connected ? `${st.user} · ${st.status}` : st.status;
    const c: ConvState | undefined = st.current ? st.convs.get(st.current) : undefined;
    title.textContent = c?.title ?? "No conversation";
    if (c !== undefined) {
      const e2ee = s.isE2ee(c.key);
      marker.textContent = e2ee ? "End-to-end encrypted" : "Server-encrypted";
      marker.className = `marker ${e2ee ? "e2ee" : "server"}`;
      if (document.visibilityState === "visible") {
        s.markRead(c.key);
        s.sendRead(c.key);
      }
      topic.textContent = c.topic ? `Topic: ${c.topic}` : "";
      const typers = s.typingNow(c.key);
      typingLine.textContent = typers.length === 0 ? "" : `${typers.join(", ")} ${typers.length === 1 ? "is" : "are"} typing…`;
      const mineLast = [...c.entries].reverse().find((e) => !e.notice && e.from === st.user);
      const readers = mineLast === undefined ? [] : s.readBy(c.key, mineLast.seq);
      readLine.textContent = readers.length === 0 ? "" : `Read by ${readers.join(", ")}`;
      if (membersOf !== c.key || membersSeen !== s.membersChanged) {
        membersOf = c.key;
        membersSeen = s.membersChanged;
        void refreshMembers(c.key);
      } else {
        drawMembers();
      }
    } else {
      marker.textContent = "";
      topic.textContent = "";
    }
    timeline.show(c?.key ?? "", c?.entries ?? []);
    drawDevices();
    if (thread !== undefined && thread.key !== st.current) showPane("members");
    drawThread();
  };
  let memberList: string[] = [];
  const drawMembers = () => {
    members.replaceChildren(
      ...memberList.map((u) => {
        const away = s.away.get(u);
        const name = s.displayNames.get(u);
        return h("li", {}, name === undefined ? u : `${name} (${u})`, " ", h("span", { class: "presence" }, away !== undefined ? `away${away ? `: ${away}` : ""}` : s.online.has(u) ? "online" : "offline"));
      }),
    );
  };
  const refreshMembers = async (key: string) => {
    memberList = await s.members(key).catch(() => []);
    render();
  };
  s.onChange = render;
  s.isVisible = () => document.visibilityState === "visible";
  s.onNotify = (t, body) => {
    if ("Notification" in window && Notification.permission === "granted" && document.visibilityState !== "visible") {
      new Notification(t, { body });
    }
  };
  document.addEventListener("visibilitychange", render);

  const run = async (line: string) => {
    const key = s.state.current;
    const c = parseCommand(line);
    const say = (t: string) => s.notice(key, t);
    switch (c.cmd) {
      case "say": {
        if (key === undefined) return say("Join a room first: /join lab");
        const p = pending;
        pending = undefined;
        pendingLine.textContent = "";
        if (p !== undefined && p.key === key && p.kind === "edit") return s.act(key, p.msgId, { kind: "Edit", text: c.text });
        if (p !== undefined && p.key === key) return s.send(key, c.text, [], { replyTo: p.msgId });
        return s.send(key, c.text);
      }
      case "me":
      case "md":
        if (key === undefined) return say("Join a room first: /join lab");
        return s.send(key, c.text, [], { action: c.cmd === "me", markdown: c.cmd === "md" });
      case "reply":
      case "edit":
      case "delete":
      case "react": {
        if (key === undefined) return say(`/${c.cmd} works in a conversation`);
        const conv = s.state.convs.get(key);
        const lines = (conv?.entries ?? []).filter((e) => !e.notice && e.msgId !== undefined && e.deleted !== true);
        const own = c.cmd === "edit" || c.cmd === "delete";
        const other = c.cmd === "reply";
        const target = [...lines].reverse().find((e) => (own ? e.from === s.state.user : other ? e.from !== s.state.user : true));
        if (target?.msgId === undefined) return say(own ? "you have no message here to change" : "there is no message here to answer");
        if (c.cmd === "reply") return s.send(key, c.text, [], { replyTo: target.msgId });
        if (c.cmd === "edit") return s.act(key, target.msgId, { kind: "Edit", text: c.text });
        if (c.cmd === "delete") return s.act(key, target.msgId, { kind: "Delete" });
        return s.act(key, target.msgId, { kind: c.on ? "React" : "Unreact", emoji: c.emoji });
      }
      case "topic": {
        const room = key?.startsWith("r:") ? key.slice(2) : undefined;
        if (room === undefined) return say("/topic works in a room");
        return s.setTopic(room, c.topic);
      }
      case "away":
        await s.setAway(c.text ?? "");
        return say(`you are away${c.text ? `: ${c.text}` : ""}; /back when you return`);
      case "back":
        await s.setAway(null);
        return say("you are back");
      case "ban":
        await s.ban(c.user, c.reason);
        return say(`banned ${c.user}`);
      case "unban":
        await s.unban(c.user);
        return say(`unbanned ${c.user}`);
      case "announce":
        return s.announce(c.text);
      case "join":
        return s.join(c.room, c.password);
      case "part": {
        const k = c.room !== undefined ? `r:${c.room}` : key;
        if (k === undefined) return say("/part which room?");
        return s.part(k);
      }
      case "create":
        return s.create(c.room, { private: c.private, server: c.server, password: c.password });
      case "invite": {
        const room = c.room ?? (key?.startsWith("r:") ? key.slice(2) : undefined);
        if (room === undefined) return say("/invite user room");
        await s.invite(room, c.user);
        return say(`invited ${c.user} to #${room}`);
      }
      case "msg": {
        const k = await s.openDirect(c.to);
        return s.send(k, c.text);
      }
      case "query":
        await s.openDirect(c.to);
        return;
      case "except":
        if (key === undefined) return;
        return s.send(key, c.text, c.users);
      case "who":
        return say(await s.who(c.room ?? (key?.startsWith("r:") ? key.slice(2) : undefined)));
      case "rooms":
        return say(await s.rooms());
      case "devices":
        return say(c.user === undefined ? `this device: ${s.state.device}, safety number ${s.state.fingerprint}` : await s.devices(c.user));
      case "history":
        if (key !== undefined) await s.loadHistory(key);
        return;
      case "search":
        return runSearch(c.query);
      case "thread": {
        if (key === undefined) return say("/thread works in a conversation");
        if (thread !== undefined) return showPane("members");
        const lines = (s.state.convs.get(key)?.entries ?? []).filter((e) => !e.notice && e.msgId !== undefined && e.deleted !== true);
        const last = lines.at(-1);
        if (last === undefined) return say("there is no message here to open a thread of");
        return openThread(key, last);
      }
      case "approve":
      case "reject":
        return decideDevice(c.device, c.cmd === "approve");
      case "name":
        await s.setDisplayName(c.name ?? null);
        return say(c.name === undefined ? "your display name is removed" : `your display name is now ${c.name}`);
      case "mute":
        if (key === undefined) return say(`/${c.on ? "mute" : "unmute"} works in a conversation`);
        await s.setMuted(key, c.on);
        return say(c.on ? "muted: messages here are still counted, but make no notification and leave the tab's title alone (/unmute)" : "unmuted");
      case "receipts":
        await s.shareReads(c.on);
        return say(c.on ? "others see how far you have read" : "your read markers are private now (others no longer see how far you have read)");
      case "kick":
      case "votekick": {
        const room = key?.startsWith("r:") ? key.slice(2) : undefined;
        if (room === undefined) return say(`/${c.cmd} works in a room`);
        if (c.cmd === "kick") return s.kick(room, c.user, c.reason);
        return s.votekick(room, c.user);
      }
      case "file":
        fileInput.click();
        return;
      case "theme":
        toggleTheme();
        return;
      case "about":
        return showAbout(aboutDialog);
      case "help":
        return say(HELP);
      case "quit":
        s.stop();
        return showSignIn(root, "Signed out.");
      case "error":
        return say(c.message);
    }
  };

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const line = composer.value;
    if (line.trim() === "") return;
    composer.value = "";
    timeline.toBottom();
    run(line).catch((err: unknown) => s.notice(s.state.current, errText(err)));
  });
  composer.addEventListener("input", () => {
    const key = s.state.current;
    if (key !== undefined && composer.value !== "" && !composer.value.startsWith("/")) s.typing(key);
  });
  composer.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && pending !== undefined) {
      pending = undefined;
      pendingLine.textContent = "";
      return;
    }
    if (e.key === "Enter" && !e.shiftKey && !e.altKey) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.altKey && (e.key === "ArrowDown" || e.key === "ArrowUp")) {
      const order = s.state.order;
      const i = order.indexOf(s.state.current ?? "");
      const next = order[(i + (e.key === "ArrowDown" ? 1 : order.length - 1)) % Math.max(order.length, 1)];
      if (next !== undefined) {
        s.state.current = next;
        s.markRead(next);
        render();
      }
      e.preventDefault();
    } else if (e.key === "Escape" && aboutDialog.open) {
      aboutDialog.close();
    } else if (e.key === "Escape" && membersPane.hidden) {
      // Esc closes the search or thread pane.
      showPane("members");
      composer.focus();
    }
  });
  fileInput.addEventListener("change", () => {
    const f = fileInput.files?.[0];
    const key = s.state.current;
    fileInput.value = "";
    if (f === undefined || key === undefined) return;
    sendFile(s, key, f, progress).catch((err: unknown) => s.notice(key, `the file was not sent: ${errText(err)}`));
  });
  searchButton.addEventListener("click", () => {
    showPane("search");
    searchBox.focus();
  });
  searchForm.addEventListener("submit", (e) => {
    e.preventDefault();
    runSearch(searchBox.value).catch((err: unknown) => (searchStatus.textContent = `The search failed: ${errText(err)}`));
  });
  closeSearch.addEventListener("click", () => {
    showPane("members");
    composer.focus();
  });
  closeThread.addEventListener("click", () => {
    showPane("members");
    composer.focus();
  });
  threadForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = threadBox.value;
    const t = thread;
    if (t === undefined || text.trim() === "") return;
    threadBox.value = "";
    s.send(t.key, text, [], { replyTo: t.root }).catch((err: unknown) => s.notice(t.key, errText(err)));
  });
  threadBox.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.altKey) {
      e.preventDefault();
      threadForm.requestSubmit();
    }
  });
  themeButton.addEventListener("click", toggleTheme);
  aboutButton.addEventListener("click", () => void showAbout(aboutDialog));
  menuButton.addEventListener("click", () => {
    const open = nav.classList.toggle("open");
    menuButton.setAttribute("aria-expanded", String(open));
  });
  render();
  composer.focus();
  if (location.hash === "#bench") exposeBench(s, render);
}

/** Under `#bench` only: fills the open conversation's timeline with `n` local rows (for the
 * rendering test and the figures in docs/benchmarks.md); nothing is sent or stored. */
function exposeBench(s: Session, render: () => void): void {
  (window as unknown as Record<string, unknown>).__conclaveFill = (n: number) => {
    const c = s.state.current ? s.state.convs.get(s.state.current) : undefined;
    if (c === undefined) return 0;
    const now = Date.now();
    for (let i = 0; i < n; i++) c.entries.push({ seq: 0, from: "bench", ts: now, text: `benchmark row ${i}`, notice: true });
    render();
    return n;
  };
}

function idOf(key: string): string {
  return Array.from(new TextEncoder().encode(key), (b) => b.toString(16).padStart(2, "0")).join("");
}

interface RowActions {
  reply: (e: Entry) => void;
  edit: (e: Entry) => void;
  del: (e: Entry) => void;
  react: (e: Entry, emoji: string) => void;
  /** Opens the line's thread (a reply's: the thread it is in). */
  thread: (e: Entry) => void;
  /** The line a reply answers, when loaded. */
  quote: (e: Entry) => Entry | undefined;
}

function renderEntry(e: Entry, s: Session, progress: HTMLProgressElement, act: RowActions): HTMLElement {
  const time = new Date(e.ts);
  const when = h("time", { datetime: time.toISOString() }, time.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }));
  if (e.notice) return withFile(h("div", { class: "row notice" }, when, " ", ...(e.from ? [h("strong", {}, e.from), " "] : []), e.text), e, s, progress);
  const text = h("span", { class: "text" });
  if (e.markdown === true && e.deleted !== true) text.append(renderMarkdown(document, e.text));
  else text.textContent = e.text;
  const row = h("div", { class: `row${e.from === s.state.user ? " own" : ""}${e.deleted === true ? " deleted" : ""}` });
  if (e.replyTo !== undefined) {
    const orig = act.quote(e);
    const quoted = orig === undefined ? "an earlier message" : `${orig.from}: ${orig.text.slice(0, REPLY_QUOTE_CHARS)}${orig.text.length > REPLY_QUOTE_CHARS ? "…" : ""}`;
    // The quote opens the thread it belongs to (with the original, even when not loaded here).
    const q = h("button", { type: "button", class: "reply-quote", title: "Open the thread" }, `↪ ${quoted}`);
    q.addEventListener("click", () => act.thread(e));
    row.append(q);
  }
  row.append(when, " ", h("strong", {}, e.from), " ", text);
  if (e.edited === true && e.deleted !== true) row.append(" ", h("span", { class: "edited" }, "(edited)"));
  const reactions = Object.entries(e.reactions ?? {}).filter(([, who]) => who.length > 0);
  if (reactions.length > 0) {
    const list = h("div", { class: "reactions", "aria-label": "Reactions" });
    for (const [emoji, who] of reactions) {
      const b = h("button", { type: "button", class: "reaction secondary", title: `${who.join(", ")} reacted with ${emoji}` }, `${emoji} ${who.length}`);
      b.addEventListener("click", () => act.react(e, emoji));
      list.append(b);
    }
    row.append(list);
  }
  if (e.msgId !== undefined && e.deleted !== true) {
    const tools = h("span", { class: "actions" });
    const button = (label: string, f: () => void) => {
      const b = h("button", { type: "button", class: "secondary" }, label);
      b.addEventListener("click", f);
      tools.append(b);
    };
    button("Reply", () => act.reply(e));
    button("Thread", () => act.thread(e));
    if (e.from === s.state.user) {
      button("Edit", () => act.edit(e));
      button("Delete", () => act.del(e));
    }
    const picker = h("span", { class: "picker", hidden: "" });
    for (const emoji of QUICK_REACTIONS) {
      const b = h("button", { type: "button", class: "secondary", "aria-label": `React with ${emoji}` }, emoji);
      b.addEventListener("click", () => act.react(e, emoji));
      picker.append(b);
    }
    button("React", () => {
      picker.hidden = !picker.hidden;
      (picker.firstElementChild as HTMLElement | null)?.focus();
    });
    tools.append(picker);
    row.append(" ", tools);
  }
  return withFile(row, e, s, progress);
}

/** A line of the thread pane: who, when, the text (Markdown rendered safely), its state. */
function threadRow(e: Entry, s: Session): HTMLElement {
  const time = new Date(e.ts);
  const text = h("span", { class: "text" });
  if (e.markdown === true && e.deleted !== true) text.append(renderMarkdown(document, e.text));
  else text.textContent = e.text;
  const row = h("div", { class: `row${e.from === s.state.user ? " own" : ""}${e.deleted === true ? " deleted" : ""}` });
  row.append(h("time", { datetime: time.toISOString() }, time.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })), " ", h("strong", {}, e.from), " ", text);
  if (e.edited === true && e.deleted !== true) row.append(" ", h("span", { class: "edited" }, "(edited)"));
  const reactions = Object.entries(e.reactions ?? {}).filter(([, who]) => who.length > 0);
  if (reactions.length > 0) row.append(" ", h("span", { class: "reactions" }, reactions.map(([emoji, who]) => `${emoji} ${who.length}`).join(" ")));
  return row;
}

/** A line that offers a file gets its Save button. */
function withFile(row: HTMLElement, e: Entry, s: Session, progress: HTMLProgressElement): HTMLElement {
  if (e.file !== undefined) {
    const file = e.file;
    const b = h("button", { type: "button", class: "secondary" }, `Save ${file.name}`);
    b.addEventListener("click", () => {
      saveFile(s, file, e.from, progress).catch((err: unknown) => s.notice(s.state.current, `the file could not be saved: ${errText(err)}`));
    });
    row.append(" ", b);
  }
  return row;
}

async function showAbout(dialog: HTMLDialogElement): Promise<void> {
  let text = "";
  try {
    const r = await fetch("/about.json", { cache: "no-store" });
    const a = (await r.json()) as { version?: string; bundle_sha256?: string };
    text = `Conclave ${a.version ?? ""}`;
    const hash = a.bundle_sha256 ?? "unknown";
    dialog.replaceChildren(
      h("h2", { id: "about-title" }, "About Conclave"),
      h("p", {}, text),
      h("p", {}, "SHA-256 of the code this server serves you (compare it with ", h("code", {}, "conclave doctor"), " on the server or with someone you trust):"),
      h("p", {}, h("code", { class: "hash", id: "bundle-sha256" }, hash)),
      closeButton(dialog),
    );
  } catch (e) {
    dialog.replaceChildren(h("h2", { id: "about-title" }, "About Conclave"), h("p", {}, `cannot ask the server: ${errText(e)}`), closeButton(dialog));
  }
  if (!dialog.open) dialog.showModal();
}

function closeButton(dialog: HTMLDialogElement): HTMLElement {
  const b = h("button", { type: "button" }, "Close");
  b.addEventListener("click", () => dialog.close());
  return b;
}
