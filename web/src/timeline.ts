// The timeline: only the rows in view (plus a margin) are in the DOM, between two spacers
// whose heights stand for the rest, so a conversation of 10,000 messages scrolls as smoothly
// as one of ten. Row heights are measured once rendered and estimated until then.

import type { Entry } from "./session.js";

/** Height assumed for a row not measured yet (px). */
export const ESTIMATED_ROW_PX = 28;
/** Rows rendered beyond the visible ones, above and below (px of margin). */
export const OVERSCAN_PX = 600;
/** Scrolling this close to the top asks for older messages (px). */
export const LOAD_OLDER_PX = 200;

export class Timeline {
  private key = "";
  private entries: Entry[] = [];
  private heights = new WeakMap<Entry, number>();
  private nodes = new WeakMap<Entry, HTMLElement>();
  private top = document.createElement("div");
  private rows = document.createElement("div");
  private bottom = document.createElement("div");
  private atBottom = true;
  private frame = 0;

  constructor(
    private el: HTMLElement,
    private renderRow: (e: Entry) => HTMLElement,
    private onTop: () => void,
  ) {
    this.top.className = "spacer";
    this.bottom.className = "spacer";
    this.rows.className = "rows";
    el.append(this.top, this.rows, this.bottom);
    el.addEventListener("scroll", () => {
      this.atBottom = el.scrollTop + el.clientHeight >= el.scrollHeight - 4;
      if (el.scrollTop < LOAD_OLDER_PX) this.onTop();
      this.schedule();
    });
    new ResizeObserver(() => this.schedule()).observe(el);
  }

  /** Shows a conversation's entries (the same array again: only what changed is redrawn). */
  show(key: string, entries: Entry[]): void {
    if (key !== this.key) {
      this.key = key;
      this.atBottom = true;
    }
    this.entries = entries;
    this.schedule();
  }

  /** Back to the newest rows (after the user sends something). */
  toBottom(): void {
    this.atBottom = true;
    this.schedule();
  }

  /** Scrolls to a line and marks it for a moment (a search result). */
  reveal(e: Entry): void {
    const i = this.entries.indexOf(e);
    if (i < 0) return;
    let above = 0;
    for (let k = 0; k < i; k++) above += this.height(this.entries[k] as Entry);
    this.atBottom = false;
    this.el.scrollTop = Math.max(0, above - this.el.clientHeight / 3);
    this.highlighted = e;
    this.schedule();
  }

  private highlighted: Entry | undefined;

  private schedule(): void {
    if (this.frame !== 0) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  private height(e: Entry): number {
    return this.heights.get(e) ?? ESTIMATED_ROW_PX;
  }

  private draw(): void {
    const el = this.el;
    const firstEntry = this.entries[0];
    const oldTopEntry = this.rows.firstElementChild as HTMLElement | null;
    const anchorOffset = oldTopEntry?.getBoundingClientRect().top ?? 0;
    const anchorIndex = oldTopEntry ? Number(oldTopEntry.dataset.index) : -1;
    const anchorEntry = anchorIndex >= 0 ? this.rendered[anchorIndex - this.renderedFrom] : undefined;
    const viewTop = this.atBottom ? Number.MAX_SAFE_INTEGER : el.scrollTop - OVERSCAN_PX;
    const viewBottom = this.atBottom ? Number.MAX_SAFE_INTEGER : el.scrollTop + el.clientHeight + OVERSCAN_PX;
    let total = 0;
    for (const e of this.entries) total += this.height(e);
    let from = 0;
    let before = 0;
    if (this.atBottom) {
      // The newest rows that fill the view and the margin.
      let h = 0;
      from = this.entries.length;
      while (from > 0 && h < el.clientHeight + OVERSCAN_PX) {
        from--;
        h += this.height(this.entries[from] as Entry);
      }
      before = total - h;
    } else {
      while (from < this.entries.length && before + this.height(this.entries[from] as Entry) < viewTop) {
        before += this.height(this.entries[from] as Entry);
        from++;
      }
    }
    let to = from;
    let h = before;
    while (to < this.entries.length && h < viewBottom) {
      h += this.height(this.entries[to] as Entry);
      to++;
    }
    const slice = this.entries.slice(from, to);
    const nodes = slice.map((e, i) => {
      let n = this.nodes.get(e);
      if (n === undefined) {
        n = this.renderRow(e);
        this.nodes.set(e, n);
      }
      n.dataset.index = String(from + i);
      return n;
    });
    // Only what changed is moved in the DOM (a live region announces insertions).
    const keep = new Set(nodes);
    for (const c of Array.from(this.rows.children)) if (!keep.has(c as HTMLElement)) c.remove();
    let at: ChildNode | null = this.rows.firstChild;
    for (const n of nodes) {
      if (at === n) {
        at = n.nextSibling;
      } else {
        this.rows.insertBefore(n, at);
      }
    }
    for (const [k, n] of nodes.entries()) n.classList.toggle("found", slice[k] === this.highlighted);
    this.rendered = slice;
    this.renderedFrom = from;
    // Measure what is drawn; the spacers stand for the rest.
    let drawn = 0;
    slice.forEach((e, i) => {
      const hgt = (nodes[i] as HTMLElement).offsetHeight || ESTIMATED_ROW_PX;
      this.heights.set(e, hgt);
      drawn += hgt;
    });
    let after = 0;
    for (let i = to; i < this.entries.length; i++) after += this.height(this.entries[i] as Entry);
    let above = 0;
    for (let i = 0; i < from; i++) above += this.height(this.entries[i] as Entry);
    this.top.style.height = `${above}px`;
    this.bottom.style.height = `${after}px`;
    if (this.atBottom) {
      el.scrollTop = el.scrollHeight;
    } else if (anchorEntry !== undefined && firstEntry !== undefined) {
      // Keep the row that was at the top where it was (older rows were added above it).
      const idx = this.entries.indexOf(anchorEntry);
      const node = idx >= from && idx < to ? (nodes[idx - from] as HTMLElement) : undefined;
      if (node !== undefined) el.scrollTop += node.getBoundingClientRect().top - anchorOffset;
    }
    void drawn;
  }

  private rendered: Entry[] = [];
  private renderedFrom = 0;

  /** Rows in the DOM now (for tests and the benchmark). */
  renderedCount(): number {
    return this.rows.childElementCount;
  }
}
