// Formatted messages (`text/markdown`): the small subset people use in chat, as the terminal
// client shows it (docs/chat.md): **bold**, *italic* (or _italic_), `inline code`, fenced code
// blocks, [links](https://…) and > quotes. Parsed into a small tree (pure, unit-tested), then
// built into DOM nodes with createElement/textContent only: message text is never HTML, so
// `<script>` in a message is the text it is. A link is a link only to http(s) or mailto
// (anything else, `javascript:` included, stays text), opens with rel="noopener noreferrer"
// and shows its address after its text, so it cannot hide where it goes. Nothing is fetched.

export type Inline =
  | { t: "text"; s: string }
  | { t: "b"; c: Inline[] }
  | { t: "i"; c: Inline[] }
  | { t: "code"; s: string }
  | { t: "a"; href: string; c: Inline[] };

export type Block = { t: "p"; c: Inline[] } | { t: "quote"; c: Inline[] } | { t: "pre"; s: string };

/** Deepest nesting of emphasis and links (deeper is shown as text). */
export const MAX_MD_DEPTH = 8;

/** Whether a link may point there: http(s) and mailto only. */
export function safeHref(href: string): boolean {
  return /^(https?:\/\/|mailto:)[^\s]+$/i.test(href);
}

function pushText(out: Inline[], s: string): void {
  if (s === "") return;
  const last = out[out.length - 1];
  if (last?.t === "text") last.s += s;
  else out.push({ t: "text", s });
}

/** Inline Markdown: code spans first (nothing inside them is markup), then links, bold and
 * italic; an opener without its closer is text. */
export function parseInline(s: string, depth = 0): Inline[] {
  const out: Inline[] = [];
  let i = 0;
  let plain = "";
  const flush = () => {
    pushText(out, plain);
    plain = "";
  };
  while (i < s.length) {
    const ch = s[i] as string;
    if (ch === "\\" && i + 1 < s.length && "\\`*_[]()>".includes(s[i + 1] as string)) {
      plain += s[i + 1];
      i += 2;
      continue;
    }
    if (ch === "`") {
      const end = s.indexOf("`", i + 1);
      if (end > i + 1) {
        flush();
        out.push({ t: "code", s: s.slice(i + 1, end) });
        i = end + 1;
        continue;
      }
    }
    if (depth < MAX_MD_DEPTH && ch === "[") {
      const close = s.indexOf("](", i + 1);
      const end = close < 0 ? -1 : s.indexOf(")", close + 2);
      if (close > i + 1 && end > close + 2) {
        const href = s.slice(close + 2, end);
        if (safeHref(href)) {
          flush();
          out.push({ t: "a", href, c: parseInline(s.slice(i + 1, close), depth + 1) });
          i = end + 1;
          continue;
        }
      }
    }
    if (depth < MAX_MD_DEPTH && ch === "*" && s[i + 1] === "*") {
      const end = s.indexOf("**", i + 2);
      if (end > i + 2) {
        flush();
        out.push({ t: "b", c: parseInline(s.slice(i + 2, end), depth + 1) });
        i = end + 2;
        continue;
      }
    }
    if (depth < MAX_MD_DEPTH && (ch === "*" || ch === "_") && s[i + 1] !== ch && s[i + 1] !== " " && s[i + 1] !== undefined) {
      const end = s.indexOf(ch, i + 1);
      if (end > i + 1 && s[end - 1] !== " ") {
        flush();
        out.push({ t: "i", c: parseInline(s.slice(i + 1, end), depth + 1) });
        i = end + 1;
        continue;
      }
    }
    plain += ch;
    i++;
  }
  flush();
  return out;
}

/** Block Markdown: fenced code blocks (```), quotes (> ), and paragraphs of the other lines. */
export function parseMarkdown(text: string): Block[] {
  const lines = text.split("\n");
  const out: Block[] = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i] as string;
    if (line.trimStart().startsWith("```")) {
      const body: string[] = [];
      i++;
      while (i < lines.length && !(lines[i] as string).trimStart().startsWith("```")) {
        body.push(lines[i] as string);
        i++;
      }
      i++; // the closing fence (or the end)
      out.push({ t: "pre", s: body.join("\n") });
      continue;
    }
    if (line.startsWith(">")) {
      out.push({ t: "quote", c: parseInline(line.replace(/^>\s?/, "")) });
      i++;
      continue;
    }
    out.push({ t: "p", c: parseInline(line) });
    i++;
  }
  return out;
}

function buildInline(doc: Document, parent: Node, list: Inline[]): void {
  for (const n of list) {
    switch (n.t) {
      case "text":
        parent.appendChild(doc.createTextNode(n.s));
        break;
      case "code": {
        const e = doc.createElement("code");
        e.textContent = n.s;
        parent.appendChild(e);
        break;
      }
      case "b":
      case "i": {
        const e = doc.createElement(n.t === "b" ? "strong" : "em");
        buildInline(doc, e, n.c);
        parent.appendChild(e);
        break;
      }
      case "a": {
        // Checked again here: nothing but http(s)/mailto ever becomes an href.
        if (!safeHref(n.href)) {
          buildInline(doc, parent, n.c);
          break;
        }
        const a = doc.createElement("a");
        a.setAttribute("href", n.href);
        a.setAttribute("rel", "noopener noreferrer");
        a.setAttribute("target", "_blank");
        buildInline(doc, a, n.c);
        parent.appendChild(a);
        parent.appendChild(doc.createTextNode(` (${n.href})`));
        break;
      }
    }
  }
}

/** DOM nodes for a Markdown message (only elements and text nodes; never parsed HTML). */
export function renderMarkdown(doc: Document, text: string): DocumentFragment {
  const frag = doc.createDocumentFragment();
  parseMarkdown(text).forEach((b, idx) => {
    if (idx > 0 && b.t === "p") frag.appendChild(doc.createElement("br"));
    if (b.t === "pre") {
      const pre = doc.createElement("pre");
      const code = doc.createElement("code");
      code.textContent = b.s;
      pre.appendChild(code);
      frag.appendChild(pre);
    } else if (b.t === "quote") {
      const q = doc.createElement("blockquote");
      buildInline(doc, q, b.c);
      frag.appendChild(q);
    } else {
      buildInline(doc, frag, b.c);
    }
  });
  return frag;
}
