// Builds the browser client into web/dist/: one bundled, minified script and one stylesheet,
// referenced from index.html. Nothing inline (the page is served with the strict CSP
// `default-src 'self'`), no third-party origin. Output names are fixed so the server can embed
// the folder as it is (the server computes the bundle's SHA-256 over what it embeds).

import { build } from "esbuild";
import { mkdirSync, readFileSync, rmSync, copyFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const web = join(dirname(fileURLToPath(import.meta.url)), "..");
const dist = join(web, "dist");
rmSync(dist, { recursive: true, force: true });
mkdirSync(dist, { recursive: true });

await build({
  entryPoints: [join(web, "src", "main.ts")],
  bundle: true,
  minify: true,
  format: "esm",
  target: ["es2022"],
  platform: "browser",
  outfile: join(dist, "app.js"),
  legalComments: "linked",
  logLevel: "warning",
});
copyFileSync(join(web, "src", "style.css"), join(dist, "style.css"));
copyFileSync(join(web, "src", "index.html"), join(dist, "index.html"));

const size = readFileSync(join(dist, "app.js")).length;
console.log(`web/dist: app.js ${(size / 1024).toFixed(0)} KiB`);
