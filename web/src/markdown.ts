// Formatted messages (`text/markdown`): the small subset people use in chat (bold, italic,
// inline code, code blocks, links, quotes; lists and headings shown plainly), parsed by
// markdown-it (CommonMark, as the terminal client's pulldown-cmark) with raw HTML off, and
// turned into a tree of a few known elements, never into an HTML string: `renderMarkdown`
// builds DOM nodes from it with createElement and text nodes only, so no message can add
// markup, attributes or script (`<script>` in a message is the text it is). A link is a link
// only to http(s) or mailto, opens with rel="noopener noreferrer" and shows its address after
// its text, so it cannot hide where it goes. Nothing is fetched. `markdownTree` is pure.

import MarkdownIt from "markdown-it";

type Token = ReturnType<MarkdownIt["parse"]>[number];

/** An element of a formatted message, or text. */
export type MdNode = string | { tag: MdTag; href?: string; children: MdNode[] };
export type MdTag = "p" | "strong" | "em" | "code" | "pre" | "blockquote" | "ul" | "ol" | "li" | "a" | "br";

const md = new MarkdownIt("commonmark", { html: false, linkify: false, typographer: false });

/** Most characters of a message rendered as Markdown (longer ones show as plain text). */
export const MAX_MARKDOWN_CHARS = 64 * 1024;

const SAFE_LINK = /^(https?:|mailto:)/i;

/** Whether a link may point there: http(s) and mailto only. */
export function safeHref(href: string): boolean {
  return SAFE_LINK.test(href) && !/\s/.test(href);
}

/** The tree of a Markdown message. */
export function markdownTree(source: string): MdNode[] {
  if (source.length > MAX_MARKDOWN_CHARS) return [source];
  const root: MdNode[] = [];
  const stack: { tag: MdTag; children: MdNode[] }[] = [];
  const out = () => stack[stack.length - 1]?.children ?? root;
  const open = (tag: MdTag, href?: string) => {
    const node = href !== undefined ? { tag, href, children: [] } : { tag, children: [] };
    out().push(node);
    stack.push(node);
  };
  const close = () => {
    stack.pop();
  };
  const walk = (tokens: Token[]) => {
    for (const t of tokens) {
      switch (t.type) {
        case "inline":
          walk(t.children ?? []);
          break;
        case "paragraph_open":
          open("p");
          break;
        case "heading_open":
          // Headings show as bold lines.
          open("p");
          open("strong");
          break;
        case "heading_close":
          close();
          close();
          break;
        case "blockquote_open":
          open("blockquote");
          break;
        case "bullet_list_open":
          open("ul");
          break;
        case "ordered_list_open":
          open("ol");
          break;
        case "list_item_open":
          open("li");
          break;
        case "strong_open":
          open("strong");
          break;
        case "em_open":
          open("em");
          break;
        case "link_open": {
          const href = t.attrGet("href") ?? "";
          if (safeHref(href)) {
            open("a", href);
          } else {
            // Not a link this page follows: its text stays, in a span-less group.
            open("em");
          }
          break;
        }
        case "link_close": {
          const link = stack[stack.length - 1];
          close();
          // The address follows the link's text, so a link cannot hide where it goes.
          if (link !== undefined && link.tag === "a" && "href" in link) {
            const text = link.children.map((c) => (typeof c === "string" ? c : "")).join("");
            if (text !== link.href) out().push(` <${String(link.href)}>`);
          }
          break;
        }
        case "paragraph_close":
        case "blockquote_close":
        case "bullet_list_close":
        case "ordered_list_close":
        case "list_item_close":
        case "strong_close":
        case "em_close":
          close();
          break;
        case "code_inline":
          out().push({ tag: "code", children: [t.content] });
          break;
        case "code_block":
        case "fence":
          out().push({ tag: "pre", children: [{ tag: "code", children: [t.content.replace(/\n$/, "")] }] });
          break;
        case "softbreak":
          out().push(" ");
          break;
        case "hardbreak":
          out().push({ tag: "br", children: [] });
          break;
        case "text":
        case "html_inline":
        case "html_block":
          out().push(t.content);
          break;
        case "hr":
          out().push({ tag: "p", children: ["———"] });
          break;
        default:
          if (t.content !== "") out().push(t.content);
          break;
      }
    }
  };
  walk(md.parse(source, {}));
  return root;
}

/** The text of a tree (for counts, mentions and tests). */
export function mdText(nodes: MdNode[]): string {
  return nodes.map((n) => (typeof n === "string" ? n : n.tag === "br" ? "\n" : mdText(n.children))).join("");
}

/** DOM nodes for a Markdown message (only elements and text nodes; never parsed HTML). */
export function renderMarkdown(doc: Document, text: string): DocumentFragment {
  const frag = doc.createDocumentFragment();
  const build = (parent: Node, nodes: MdNode[]) => {
    for (const n of nodes) {
      if (typeof n === "string") {
        parent.appendChild(doc.createTextNode(n));
        continue;
      }
      const e = doc.createElement(n.tag);
      if (n.tag === "a") {
        // Checked again here: nothing but http(s)/mailto ever becomes an href.
        if (n.href === undefined || !safeHref(n.href)) {
          build(parent, n.children);
          continue;
        }
        e.setAttribute("href", n.href);
        e.setAttribute("rel", "noopener noreferrer");
        e.setAttribute("target", "_blank");
      }
      build(e, n.children);
      parent.appendChild(e);
    }
  };
  build(frag, markdownTree(text));
  return frag;
}
