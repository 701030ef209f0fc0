// Mentions and local search, as the native client judges them (crates/conclave-client/src/
// chat.rs `mention_in`, `outside_code`; conclave-e2ee's local search): pure, so the unit
// tests pin them.

export type Mention = "me" | "room";

const isName = (c: string) => /^[A-Za-z0-9_.-]$/.test(c);

/** Whether `text` mentions `me` (`@me`, any case, as a whole name), or is an `@room` from the
 * room's owner (`fromOwner`). A mention is `@` at the start or after a character that cannot
 * be part of a name, then a name; trailing `.` and `-` are punctuation. */
export function mentionIn(text: string, me: string, fromOwner: boolean): Mention | undefined {
  let found: Mention | undefined;
  const chars = Array.from(text);
  const low = me.toLowerCase();
  for (let i = 0; i < chars.length; i++) {
    if (chars[i] !== "@" || (i > 0 && isName(chars[i - 1] ?? ""))) continue;
    let j = i + 1;
    while (j < chars.length && isName(chars[j] ?? "")) j++;
    const name = chars.slice(i + 1, j).join("").replace(/[.-]+$/, "").toLowerCase();
    if (name === "") continue;
    if (name === low) return "me";
    if (fromOwner && name === "room") found = "room";
  }
  return found;
}

/** A Markdown message's text outside its code spans and fenced or indented code blocks (a
 * name quoted in code is not a mention). */
export function outsideCode(markdown: string): string {
  return markdown
    .replace(/^(```|~~~)[^\n]*\n[\s\S]*?(^\1[^\n]*$|(?![\s\S]))/gm, " ")
    .replace(/^(?: {4}|\t).*$/gm, " ")
    .replace(/(`+)[\s\S]*?\1/g, " ");
}

/** Lower case without accents, for matching as the server's search does (case- and
 * accent-insensitive). */
export function fold(s: string): string {
  return s.normalize("NFD").replace(/\p{M}/gu, "").toLowerCase();
}

/** Words of a query kept (more are ignored). */
export const MAX_QUERY_WORDS = 16;

/** The words of a query (folded, split at white space), as the native client's local search. */
export function queryWords(query: string): string[] {
  return fold(query)
    .split(/\s+/u)
    .filter((w) => w.length > 0)
    .slice(0, MAX_QUERY_WORDS);
}

/** Whether `text` contains every word of the query, ignoring case and accents (the native
 * client's local search ignores case). */
export function matchesQuery(text: string, words: string[]): boolean {
  if (words.length === 0) return false;
  const t = fold(text);
  return words.every((w) => t.includes(w));
}
