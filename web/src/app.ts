// The page: the sign-in form, then the conversation list (a navigation landmark "Rooms"), the
// timeline (role `log`, rendering only the rows in view) and the composer (a text box
// "Message" that takes the terminal client's slash commands). Built with the DOM API only (no
// inline script or style: the page runs under `default-src 'self'`).

import { Session, errText, type ConvState, type Entry } from "./session.js";
import { HELP, parseCommand } from "./commands.js";
import { Timeline } from "./timeline.js";
import { sendFile, saveFile } from "./files.js";
import { ACT_DELETE, ACT_EDIT, ACT_REACT, ACT_UNREACT, reactionsShown } from "./acts.js";

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
  const themeButton = h("button", { type: "button", class: "secondary" }, "Theme");
  const menuButton = h("button", { type: "button", class: "secondary menu", "aria-controls": "convs", "aria-expanded": "false" }, "Conversations");
  const header = h("header", {}, menuButton, title, marker, status, themeButton, aboutButton);
  const log = h("div", { role: "log", "aria-label": "Messages", "aria-live": "polite", class: "timeline", tabindex: "0" });
  const composer = h("textarea", { "aria-label": "Message", rows: "1", placeholder: "Message, or /help" }) as HTMLTextAreaElement;
  const fileInput = h("input", { type: "file", id: "file", class: "visually-hidden" }) as HTMLInputElement;
  const fileLabel = h("label", { for: "file", class: "button secondary" }, "Attach a file");
  const sendButton = h("button", { type: "submit" }, "Send");
  const progress = h("progress", { max: "1", value: "0", hidden: "", "aria-label": "File transfer" }) as HTMLProgressElement;
  const form = h("form", { class: "composer" }, composer, fileLabel, fileInput, sendButton, progress) as HTMLFormElement;
  const aboutDialog = h("dialog", { "aria-labelledby": "about-title" }) as HTMLDialogElement;
  nav.id = "convs";
  const mainArea = h("main", { class: "conv" }, header, log, form);
  root.replaceChildren(h("div", { class: "layout" }, nav, mainArea), aboutDialog);

  const timeline = new Timeline(log, (e) => renderEntry(e, s, progress), () => {
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
      totalUnread += c.unread;
      const badge = c.unread > 0 ? h("span", { class: "badge", "aria-hidden": "true" }, String(c.unread)) : "";
      const desc = h("span", { class: "visually-hidden", id: `unread-${idOf(key)}` }, c.unread > 0 ? `${c.unread} unread${c.mentions > 0 ? `, ${c.mentions} mentions` : ""}` : "");
      const b = h("button", { type: "button", class: key === st.current ? "current" : "", "aria-describedby": `unread-${idOf(key)}` }, c.title);
      if (key === st.current) b.setAttribute("aria-current", "page");
      b.addEventListener("click", () => {
        st.current = key;
        s.markRead(key);
        nav.classList.remove("open");
        render();
        composer.focus();
      });
      items.push(h("li", {}, b, badge, desc));
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
      if (document.visibilityState === "visible") s.markRead(c.key);
    } else {
      marker.textContent = "";
    }
    timeline.show(c?.key ?? "", c?.entries ?? []);
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
      case "say":
        if (key === undefined) return say("Join a room first: /join lab");
        return s.send(key, c.text);
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
        return say(await s.search(c.query));
      case "kick":
      case "votekick": {
        const room = key?.startsWith("r:") ? key.slice(2) : undefined;
        if (room === undefined) return say(`/${c.cmd} works in a room`);
        if (c.cmd === "kick") return s.kick(room, c.user, c.reason);
        return s.votekick(room, c.user);
      }
      case "reply":
      case "edit":
      case "delete":
      case "react":
      case "me": {
        if (key === undefined) return say("Open a conversation first");
        if (c.cmd === "reply") return s.reply(key, c.text);
        if (c.cmd === "me") return s.action(key, c.text);
        if (c.cmd === "edit") return s.act(key, ACT_EDIT, c.text);
        if (c.cmd === "delete") return s.act(key, ACT_DELETE, "");
        return s.act(key, c.on ? ACT_REACT : ACT_UNREACT, c.emoji);
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
  composer.addEventListener("keydown", (e) => {
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
    }
  });
  fileInput.addEventListener("change", () => {
    const f = fileInput.files?.[0];
    const key = s.state.current;
    fileInput.value = "";
    if (f === undefined || key === undefined) return;
    sendFile(s, key, f, progress).catch((err: unknown) => s.notice(key, `the file was not sent: ${errText(err)}`));
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

function renderEntry(e: Entry, s: Session, progress: HTMLProgressElement): HTMLElement {
  const time = new Date(e.ts);
  const when = h("time", { datetime: time.toISOString() }, time.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }));
  const row = e.notice
    ? h("div", { class: "row notice" }, when, " ", ...(e.from ? [h("strong", {}, e.from), " "] : []), e.text)
    : h("div", { class: `row${e.from === s.state.user ? " own" : ""}` }, when, " ", h("strong", {}, e.from), " ", h("span", { class: "text" }, e.text));
  const reactions = e.notice === true ? undefined : reactionsShown(e);
  if (reactions !== undefined) {
    row.append(" ", h("span", { class: "reactions", title: reactions.who, "aria-label": `reactions: ${reactions.who}` }, reactions.text));
  }
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
