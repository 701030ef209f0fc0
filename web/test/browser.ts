// A headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core) as a JSON-lines
// peer on stdin/stdout, for the Rust browser tests (crates/conclave/tests/web_browser.rs). The
// Rust test starts the server and the JSON clients and says what the web user does; every
// wait here is bounded (WAIT_MS). Replies: {"ok":true,...} or {"error":"..."}.
//
// Environment: CONCLAVE_URL (https://127.0.0.1:PORT), CHROMIUM (default /usr/bin/chromium).

import { createInterface } from "node:readline";
import { existsSync, mkdirSync } from "node:fs";
import { dirname } from "node:path";
import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";

const WAIT_MS = 20_000;
const url = process.env.CONCLAVE_URL ?? "";
const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
if (!existsSync(executablePath)) {
  console.error(`no Chromium at ${executablePath}: apt-get install chromium chromium-driver (CI's .ci/run does)`);
  process.exit(3);
}

type Req = Record<string, unknown>;
let page: Page | undefined;

function s(r: Req, k: string): string {
  const v = r[k];
  if (typeof v !== "string") throw new Error(`field ${k} must be a string`);
  return v;
}

function current(): Page {
  if (page === undefined) throw new Error("no page open");
  return page;
}

async function openPage(path = ""): Promise<Page> {
  page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  const errors: string[] = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => {
    if (m.type() === "error") console.error(`[page] ${m.text()}`);
  });
  await page.goto(url + path);
  return page;
}

async function log(p: Page): Promise<string> {
  return (await p.getByRole("log").textContent()) ?? "";
}

/** Fills the sign-in form: user, password, and under "More options" the server password and
 * the invite code when given. */
async function fillSignIn(p: Page, r: Req): Promise<void> {
  await p.getByLabel("User name").fill(s(r, "user"));
  await p.getByLabel("Password", { exact: true }).fill(s(r, "password"));
  if (typeof r.server_password === "string" || typeof r.invite === "string") {
    const more = p.locator("details");
    if ((await more.getAttribute("open")) === null) await p.getByText("More options").click();
    if (typeof r.server_password === "string") await p.getByLabel("Server password").fill(r.server_password);
    if (typeof r.invite === "string") await p.getByLabel("Invite code").fill(r.invite);
  }
}

/** What the sign-in form says once it has refused (its buttons usable again). */
async function refusal(p: Page): Promise<string> {
  const deadline = Date.now() + WAIT_MS;
  while (Date.now() < deadline) {
    const busy = await p.getByRole("button", { name: "Sign in" }).isDisabled().catch(() => true);
    const text = (await p.locator(".error").textContent().catch(() => "")) ?? "";
    if (!busy && text !== "") return text;
    await p.waitForTimeout(100);
  }
  throw new Error("the sign-in form never refused");
}

async function handle(r: Req): Promise<Req> {
  switch (s(r, "op")) {
    case "open":
      await openPage(typeof r.path === "string" ? r.path : "");
      return {};
    case "sign_in":
    case "register": {
      const p = current();
      await fillSignIn(p, r);
      await p.getByRole("button", { name: s(r, "op") === "register" ? "Create account" : "Sign in" }).click();
      try {
        await p.getByRole("textbox", { name: "Message" }).waitFor();
      } catch {
        const shown = (await p.locator(".error").textContent().catch(() => "")) ?? "";
        throw new Error(`signing in did not reach the conversations; the page says: ${shown}`);
      }
      return {};
    }
    case "register_fails":
    case "sign_in_fails": {
      // The sign-in form says why it refused (returned); the page stays on the form.
      const p = current();
      await fillSignIn(p, r);
      // What the form said before ("Signed out.") is not the answer.
      await p.locator(".error").evaluate((e) => (e.textContent = ""));
      await p.getByRole("button", { name: s(r, "op") === "register_fails" ? "Create account" : "Sign in" }).click();
      return { error: await refusal(p) };
    }
    case "second_tab": {
      // Another tab of this browser signs in: returns what its form says; the tab is closed.
      const tab = await context.newPage();
      tab.setDefaultTimeout(WAIT_MS);
      try {
        await tab.goto(url);
        await fillSignIn(tab, r);
        await tab.getByRole("button", { name: "Sign in" }).click();
        return { error: await refusal(tab) };
      } finally {
        await tab.close();
      }
    }
    case "type": {
      const box = current().getByRole("textbox", { name: "Message" });
      await box.fill(s(r, "text"));
      await box.press("Enter");
      return {};
    }
    case "open_conv":
      await current().getByRole("navigation", { name: "Rooms" }).getByRole("button", { name: s(r, "name"), exact: true }).click();
      return {};
    case "has_conv": {
      const nav = current().getByRole("navigation", { name: "Rooms" });
      await nav.getByRole("button", { name: s(r, "name"), exact: true }).waitFor();
      return {};
    }
    case "wait_text": {
      // The timeline (role log) of the open conversation shows this text.
      const p = current();
      const text = s(r, "text");
      const deadline = Date.now() + WAIT_MS;
      while (Date.now() < deadline) {
        if ((await log(p)).includes(text)) return {};
        await p.waitForTimeout(100);
      }
      throw new Error(`the timeline never showed ${JSON.stringify(text)}; it shows: ${(await log(p)).slice(-600)}`);
    }
    case "wait_no_text": {
      // The timeline of the open conversation no longer shows this text (a delete).
      const p = current();
      const text = s(r, "text");
      const deadline = Date.now() + WAIT_MS;
      while (Date.now() < deadline) {
        if (!(await log(p)).includes(text)) return {};
        await p.waitForTimeout(100);
      }
      throw new Error(`the timeline still shows ${JSON.stringify(text)}`);
    }
    case "scroll_up_until": {
      // Scrolls the timeline to the top (loading older history) until it shows this text.
      const p = current();
      const text = s(r, "text");
      const deadline = Date.now() + WAIT_MS;
      while (Date.now() < deadline) {
        await p.evaluate("document.querySelector('.timeline').scrollTop = 0");
        await p.waitForTimeout(200);
        if ((await log(p)).includes(text)) return {};
      }
      throw new Error(`scrolling up never showed ${JSON.stringify(text)}; the timeline shows: ${(await log(p)).slice(0, 600)}`);
    }
    case "count_text": {
      const t = await log(current());
      return { count: t.split(s(r, "text")).length - 1 };
    }
    case "marker":
      return { marker: (await current().locator("#marker").textContent()) ?? "" };
    case "title":
      return { title: await current().title() };
    case "log":
      return { log: await log(current()) };
    case "wait_title": {
      const p = current();
      const want = s(r, "contains");
      const deadline = Date.now() + WAIT_MS;
      while (Date.now() < deadline) {
        if ((await p.title()).includes(want)) return { title: await p.title() };
        await p.waitForTimeout(100);
      }
      throw new Error(`the tab title never contained ${want}: ${await p.title()}`);
    }
    case "press":
      await current().keyboard.press(s(r, "key"));
      return {};
    case "conv_title":
      return { title: (await current().locator("#conv-title").textContent()) ?? "" };
    case "theme":
      return { theme: await current().evaluate("document.documentElement.dataset.theme ?? ''") };
    case "reload":
      await current().reload();
      return {};
    case "close":
      await current().close();
      page = undefined;
      return {};
    case "screenshot": {
      const path = s(r, "path");
      mkdirSync(dirname(path), { recursive: true });
      const width = typeof r.width === "number" ? r.width : 1100;
      const height = typeof r.height === "number" ? r.height : 700;
      await current().setViewportSize({ width, height });
      await current().waitForTimeout(150);
      await current().screenshot({ path });
      return {};
    }
    case "attach": {
      const p = current();
      await p.locator("#file").setInputFiles(s(r, "path"));
      return {};
    }
    case "save_file": {
      const p = current();
      const download = p.waitForEvent("download", { timeout: WAIT_MS });
      await p.getByRole("button", { name: `Save ${s(r, "name")}` }).last().click();
      const d = await download;
      const path = s(r, "path");
      await d.saveAs(path);
      return { path };
    }
    case "about": {
      const p = current();
      await p.getByRole("button", { name: "About" }).click();
      const hash = (await p.locator("#bundle-sha256").textContent()) ?? "";
      return { bundle_sha256: hash };
    }
    case "close_dialog":
      await current().getByRole("button", { name: "Close" }).click();
      return {};
    case "wait_in": {
      // The element `selector` shows this text (the typing line, "read by", the topic, …).
      const p = current();
      const sel = s(r, "selector");
      const text = s(r, "text");
      const deadline = Date.now() + WAIT_MS;
      let shown = "";
      while (Date.now() < deadline) {
        shown = (await p.locator(sel).first().textContent().catch(() => "")) ?? "";
        if (shown.includes(text)) return { text: shown };
        await p.waitForTimeout(100);
      }
      throw new Error(`${sel} never showed ${JSON.stringify(text)}; it shows: ${shown.slice(-300)}`);
    }
    case "row": {
      // The last timeline line that shows `text`, once it also shows `contains` (when given):
      // its text and its reactions' titles (who reacted).
      const p = current();
      const row = p.locator(".timeline .rows > .row").filter({ hasText: s(r, "text") }).last();
      const want = typeof r.contains === "string" ? r.contains : "";
      const deadline = Date.now() + WAIT_MS;
      let shown = "";
      while (Date.now() < deadline) {
        shown = (await row.textContent({ timeout: 200 }).catch(() => "")) ?? "";
        if (shown !== "" && shown.includes(want)) {
          const titles = await row.locator(".reactions button").evaluateAll((bs) => bs.map((b) => b.getAttribute("title") ?? ""));
          return { text: shown, titles };
        }
        await p.waitForTimeout(100);
      }
      throw new Error(`no line with ${JSON.stringify(s(r, "text"))} showing ${JSON.stringify(want)}; last seen: ${shown.slice(-300)}`);
    }
    case "row_action": {
      // Uses a line's action button (Reply, Edit, Delete, React) reached by keyboard focus,
      // as a keyboard user would; React then picks `emoji`.
      const p = current();
      const row = p.locator(".timeline .rows > .row").filter({ hasText: s(r, "text") }).last();
      const action = row.getByRole("button", { name: s(r, "action"), exact: true });
      await action.focus();
      await action.press("Enter");
      if (s(r, "action") === "React") await row.getByRole("button", { name: `React with ${s(r, "emoji")}` }).click();
      return {};
    }
    case "search": {
      // Searches with the Search pane's box; the results' texts once the pane says how many.
      const p = current();
      const pane = p.getByRole("complementary", { name: "Search" });
      if (await pane.isHidden()) await p.getByRole("button", { name: "Search", exact: true }).click();
      const box = pane.getByRole("searchbox", { name: "Search messages" });
      await box.fill(s(r, "query"));
      await box.press("Enter");
      const deadline = Date.now() + WAIT_MS;
      while (Date.now() < deadline) {
        const status = (await p.locator("#search-status").textContent()) ?? "";
        if (/result|Nothing found/.test(status)) {
          const hits = await pane.getByRole("list", { name: "Search results" }).locator("li").evaluateAll((ls) => ls.map((l) => l.textContent ?? ""));
          return { status, hits };
        }
        await p.waitForTimeout(100);
      }
      throw new Error("the search never finished");
    }
    case "click_hit": {
      // Opens a search result; returns the conversation then shown and the line marked.
      const p = current();
      await p.getByRole("list", { name: "Search results" }).getByRole("button").filter({ hasText: s(r, "text") }).first().click();
      const found = p.locator(".timeline .row.found");
      await found.waitFor();
      return { title: (await p.locator("#conv-title").textContent()) ?? "", found: (await found.textContent()) ?? "" };
    }
    case "thread_reply": {
      const box = current().getByRole("textbox", { name: "Reply in thread" });
      await box.fill(s(r, "text"));
      await box.press("Enter");
      return {};
    }
    case "nav_item": {
      // The conversation list's entry of a conversation, as text (name, unread, mentions).
      const item = current().getByRole("navigation", { name: "Rooms" }).locator("li").filter({ has: current().getByRole("button", { name: s(r, "name"), exact: true }) });
      const want = typeof r.contains === "string" ? r.contains : "";
      const deadline = Date.now() + WAIT_MS;
      let shown = "";
      while (Date.now() < deadline) {
        shown = (await item.textContent({ timeout: 200 }).catch(() => "")) ?? "";
        if (shown.includes(want)) return { text: shown };
        await current().waitForTimeout(100);
      }
      throw new Error(`the entry of ${s(r, "name")} never showed ${JSON.stringify(want)}: ${shown}`);
    }
    case "visibility": {
      // Pretends the tab is hidden (or shown again), as switching tabs would (see the init
      // script below).
      await current().evaluate(`window.__conclaveHidden = ${r.hidden === true}; document.dispatchEvent(new Event("visibilitychange"));`);
      return {};
    }
    case "notifications":
      // The desktop notifications the page made (recorded by the init script below).
      return { notes: await current().evaluate("window.__conclaveNotes ?? []") };
    case "click_quote": {
      // The quote above a reply (it opens the thread).
      const row = current().locator(".timeline .rows > .row").filter({ hasText: s(r, "text") }).last();
      await row.locator(".reply-quote").click();
      return {};
    }
    case "click":
      // A button, by its accessible name.
      await current().getByRole("button", { name: s(r, "name"), exact: true }).click();
      return {};
    case "rendered_rows":
      return { rows: await current().locator(".timeline .rows > .row").count() };
    case "eval": {
      // A measurement for the benchmark figures (memory).
      const v = await current().evaluate(s(r, "expr"));
      return { value: v as never };
    }
    default:
      throw new Error(`unknown op ${s(r, "op")}`);
  }
}

const browser: Browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-dev-shm-usage", "--enable-precise-memory-info"],
});
const context: BrowserContext = await browser.newContext({
  ignoreHTTPSErrors: true,
  acceptDownloads: true,
  viewport: { width: 1100, height: 700 },
  permissions: ["notifications"],
});
// Headless pages are always visible and show no notifications: this records each desktop
// notification the page makes (window.__conclaveNotes) and lets the test hide the tab
// (window.__conclaveHidden), in every page of the context, before the page's own script runs.
await context.addInitScript(() => {
  const w = window as unknown as Record<string, unknown>;
  const Real = window.Notification;
  class Recorded extends Real {
    constructor(title: string, options?: NotificationOptions) {
      const notes = (w.__conclaveNotes ??= []) as { title: string; body: string }[];
      notes.push({ title, body: options?.body ?? "" });
      super(title, options);
    }
  }
  window.Notification = Recorded;
  Object.defineProperty(document, "visibilityState", { get: () => (w.__conclaveHidden === true ? "hidden" : "visible") });
});

const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  if (line.trim() === "") continue;
  let reply: Req;
  try {
    reply = { ok: true, ...(await handle(JSON.parse(line) as Req)) };
  } catch (e) {
    reply = { error: e instanceof Error ? e.message : String(e) };
  }
  process.stdout.write(JSON.stringify(reply) + "\n");
}
await browser.close();
