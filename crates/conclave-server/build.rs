//! Embeds the web client (`web/dist/`, built by `npm ci && npm run build` in `web/`) in the
//! server at compile time, with each file's SHA-256 and the bundle's.
//!
//! When `web/package.json` exists and `npm` is on the PATH, the bundle is built here (set
//! `CONCLAVE_WEB_BUILD=0` to skip that and embed `web/dist/` as it is). Without Node.js, an
//! existing `web/dist/` is embedded as it is, or else a one-page placeholder that says how to
//! build the client; either way the build goes on (with a warning), so the Rust side builds
//! and tests on a machine without Node.js.
//!
//! The bundle's SHA-256 is the SHA-256 of the `sha256sum` listing of `web/dist/` (files sorted
//! by path, bytewise), so anyone can recompute it with
//! `cd web/dist && find . -type f -printf '%P\n' | LC_ALL=C sort | xargs -d '\n' sha256sum | sha256sum`.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Source entries of `web/` whose change rebuilds the bundle. Not `dist/` (the build writes
/// it) nor `node_modules/` (npm writes it).
const WEB_SOURCES: &[&str] = &[
    "package.json",
    "package-lock.json",
    "index.html",
    "src",
    "public",
    "patches",
    "scripts",
    "vite.config.ts",
    "vite.config.js",
    "vite.config.mjs",
    "tsconfig.json",
    "esbuild.config.mjs",
    "build.mjs",
];

/// The most bytes embedded: a bundle larger than this is surely a mistake (a stray file).
const MAX_BUNDLE_BYTES: u64 = 64 * 1024 * 1024;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CONCLAVE_WEB_BUILD");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let web = manifest.join("../../web");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    // Only paths that exist are watched: cargo takes a missing one as changed at every build,
    // and would rebuild the server each time. `web/src/` always exists (the generated protocol
    // types live in it), so the web client's sources arriving there are noticed.
    for entry in WEB_SOURCES {
        let p = web.join(entry);
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    let may_build = std::env::var("CONCLAVE_WEB_BUILD").map_or(true, |v| v != "0");
    if web.join("package.json").exists() && may_build {
        if npm_available() {
            build_bundle(&web);
        } else {
            println!(
                "cargo:warning=Node.js (npm) not found: the web client is not rebuilt; install Node.js (with npm) and build again to serve it"
            );
        }
    }
    let dist = web.join("dist");
    let (files, built) = if dist.join("index.html").is_file() {
        (collect(&dist), true)
    } else {
        (placeholder(&out), false)
    };
    if !built {
        println!(
            "cargo:warning=web/dist/index.html is missing: the server serves a page that says how to build the web client"
        );
    }
    write_assets(&out, &files, built);
}

fn npm_available() -> bool {
    Command::new("npm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `npm ci` when `node_modules` is missing or older than the lockfile, then `npm run build`.
fn build_bundle(web: &Path) {
    let lock = web.join("package-lock.json");
    let installed = web.join("node_modules/.package-lock.json");
    let stale = match (modified(&lock), modified(&installed)) {
        (_, None) => true,
        (Some(l), Some(i)) => l > i,
        (None, Some(_)) => false,
    };
    if stale {
        let install = if lock.exists() { "ci" } else { "install" };
        run_npm(web, &[install, "--no-audit", "--no-fund"]);
    }
    run_npm(web, &["run", "build"]);
}

fn run_npm(web: &Path, args: &[&str]) {
    let out = Command::new("npm").args(args).current_dir(web).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "`npm {}` failed in {} ({}):\n{}\n{}\nFix the web client's build (or set CONCLAVE_WEB_BUILD=0 to embed web/dist as it is)",
            args.join(" "),
            web.display(),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("cannot run npm in {}: {e}", web.display()),
    }
}

fn modified(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// One embedded file: its URL path (no leading slash), where it is on disk, its hash.
struct File {
    path: String,
    disk: PathBuf,
    sha256: String,
}

/// Every file under `dist`, sorted bytewise by path.
fn collect(dist: &Path) -> Vec<File> {
    let mut found = Vec::new();
    walk(dist, dist, &mut found);
    found.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    let total: u64 = found
        .iter()
        .map(|f| std::fs::metadata(&f.disk).map_or(0, |m| m.len()))
        .sum();
    assert!(
        total <= MAX_BUNDLE_BYTES,
        "web/dist holds {total} bytes, over the {MAX_BUNDLE_BYTES} embedded at most; is something stray in it?"
    );
    found
}

fn walk(root: &Path, dir: &Path, found: &mut Vec<File>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
        let p = entry.path();
        if p.is_dir() {
            walk(root, &p, found);
        } else if p.is_file() {
            let rel = p
                .strip_prefix(root)
                .expect("under the root")
                .to_str()
                .unwrap_or_else(|| panic!("{} is not UTF-8: rename it", p.display()))
                .to_string();
            let bytes =
                std::fs::read(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
            found.push(File {
                path: rel,
                disk: p,
                sha256: hex::encode(Sha256::digest(&bytes)),
            });
        }
    }
}

/// The page served when the web client was not built.
fn placeholder(out: &Path) -> Vec<File> {
    let html = "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
<title>Conclave: web client not built</title>\n</head>\n<body>\n\
<h1>The web client was not built into this server</h1>\n\
<p>This <code>conclave</code> binary was compiled without the web client's files \
(<code>web/dist/</code>). Install Node.js (with npm), then build the server again \
from the source tree (<code>cargo build --release</code>): the build runs \
<code>npm ci &amp;&amp; npm run build</code> in <code>web/</code> and embeds the result.</p>\n\
<p>Native clients (<code>conclave chat</code>, <code>conclave client --json</code>) work \
without it.</p>\n</body>\n</html>\n";
    let disk = out.join("placeholder-index.html");
    std::fs::write(&disk, html).expect("write the placeholder page");
    vec![File {
        path: "index.html".to_string(),
        disk,
        sha256: hex::encode(Sha256::digest(html.as_bytes())),
    }]
}

fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "webmanifest" => "application/manifest+json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "ico" => "image/x-icon",
        "webp" => "image/webp",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "wasm" => "application/wasm",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn write_assets(out: &Path, files: &[File], built: bool) {
    let mut listing = String::new();
    let mut code = String::from("// Generated by build.rs: the embedded web client.\n");
    code.push_str("pub static ASSETS: &[Asset] = &[\n");
    for f in files {
        listing.push_str(&format!("{}  {}\n", f.sha256, f.path));
        code.push_str(&format!(
            "    Asset {{ path: {:?}, content_type: {:?}, bytes: include_bytes!({:?}), sha256: {:?} }},\n",
            f.path,
            content_type(&f.path),
            f.disk.canonicalize().unwrap_or_else(|_| f.disk.clone()),
            f.sha256
        ));
    }
    code.push_str("];\n");
    let bundle = hex::encode(Sha256::digest(listing.as_bytes()));
    code.push_str(&format!("pub const BUNDLE_SHA256: &str = {bundle:?};\n"));
    code.push_str(&format!("pub const BUILT: bool = {built};\n"));
    let target = out.join("web_assets.rs");
    if std::fs::read_to_string(&target).ok().as_deref() != Some(code.as_str()) {
        std::fs::write(&target, code).expect("write web_assets.rs");
    }
}
