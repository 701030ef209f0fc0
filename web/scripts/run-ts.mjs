// Runs a TypeScript entry point of web/ under Node: bundles it with esbuild into web/.build/
// and imports the result. Used by the Rust tests (the MLS interop peer, the browser tests).
//   node scripts/run-ts.mjs test/interop-peer.ts [args...]

import { build } from "esbuild";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const web = join(dirname(fileURLToPath(import.meta.url)), "..");
const entry = process.argv[2];
if (entry === undefined) {
  console.error("usage: node scripts/run-ts.mjs FILE.ts [args...]");
  process.exit(2);
}
const out = join(web, ".build", `${basename(entry, ".ts")}-${process.pid}.mjs`);
await build({
  entryPoints: [resolve(web, entry)],
  bundle: true,
  format: "esm",
  platform: "node",
  target: ["node20"],
  outfile: out,
  packages: "external",
  logLevel: "warning",
});
process.argv.splice(2, 1);
const { rmSync } = await import("node:fs");
try {
  await import(pathToFileURL(out).href);
} finally {
  rmSync(out, { force: true });
}
