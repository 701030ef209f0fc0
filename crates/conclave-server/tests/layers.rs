//! The server crate's modules import only downward: no module imports another that (directly
//! or through others) imports it back. ARCHITECTURE.md draws the layers this test checks.
//!
//! A module is a top-level module of `src/` (a file `src/x.rs` or a directory `src/x/` with its
//! children); a use of `crate::x…` from inside another module is an import of `x`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The text without comments (line comments, doc comments, block comments) and string
/// literals, so a path named in prose or in a message is no import.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0usize;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            // Copy one UTF-8 character.
            let ch = src[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules a piece of code names through `crate::`.
fn imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `conclave_crate::…` or similar: not this crate
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c, d::{e, f}}`: the first segment of each top-level item.
            let mut depth = 0usize;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_ascii_alphabetic() || c == '_') => {
                        found.insert(ident_at(&group[i..]).to_string());
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident_at(rest);
            if !name.is_empty() {
                found.insert(name.to_string());
            }
        }
    }
    found
}

fn collect(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect(&p, files);
        } else if p.extension().is_some_and(|e| e == "rs") {
            files.push(p);
        }
    }
}

/// The crate's module graph: top-level module -> the top-level modules it imports.
fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    collect(src, &mut files);
    let mut g = Graph::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let first = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a path");
        let module = first.strip_suffix(".rs").unwrap_or(first).to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read a source file");
        let deps = g.entry(module.clone()).or_default();
        for dep in imports(&code_only(&text)) {
            if dep != module {
                deps.insert(dep);
            }
        }
    }
    // Only imports of the crate's modules (not `crate::Config` re-exports from lib.rs).
    let modules: BTreeSet<String> = g.keys().cloned().collect();
    for deps in g.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    g
}

/// A cycle in the graph, if there is one: the modules around it, the first repeated last.
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        g: &Graph,
        v: &str,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(v) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = path.iter().position(|p| p == v).unwrap_or(0);
                let mut cycle = path[from..].to_vec();
                cycle.push(v.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(v.to_string(), Mark::Open);
        path.push(v.to_string());
        for w in g.get(v).into_iter().flatten() {
            if let Some(c) = visit(g, w, marks, path) {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(v.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for v in g.keys() {
        if let Some(c) = visit(g, v, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

/// Each module's layer: 0 for those that import none of the others, else one above the
/// highest it imports.
fn layers(g: &Graph) -> BTreeMap<String, usize> {
    fn level(g: &Graph, v: &str, memo: &mut BTreeMap<String, usize>) -> usize {
        if let Some(l) = memo.get(v) {
            return *l;
        }
        let l = g
            .get(v)
            .into_iter()
            .flatten()
            .map(|w| level(g, w, memo) + 1)
            .max()
            .unwrap_or(0);
        memo.insert(v.to_string(), l);
        l
    }
    let mut memo = BTreeMap::new();
    for v in g.keys() {
        level(g, v, &mut memo);
    }
    memo
}

#[test]
fn the_checker_reads_imports_and_finds_cycles() {
    let code = code_only(
        "use crate::a::B;\n// crate::c in a comment\nuse crate::{d, e::{F, g}, h};\n\
         let s = \"crate::i\"; fn f() { crate::j::k(); other_crate::l(); }\n/* crate::m */",
    );
    let found: Vec<String> = imports(&code).into_iter().collect();
    assert_eq!(found, ["a", "d", "e", "h", "j"]);
    let mut g = Graph::new();
    g.entry("x".into()).or_default().insert("y".into());
    g.entry("y".into()).or_default().insert("z".into());
    g.entry("z".into()).or_default();
    assert_eq!(find_cycle(&g), None);
    assert_eq!(layers(&g)["x"], 2);
    g.entry("z".into()).or_default().insert("x".into());
    assert_eq!(
        find_cycle(&g),
        Some(vec!["x".into(), "y".into(), "z".into(), "x".into()])
    );
}

#[test]
fn server_modules_import_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    assert!(
        g.len() > 20,
        "the crate's modules were found: {:?}",
        g.keys()
    );
    if let Some(cycle) = find_cycle(&g) {
        panic!(
            "these modules import each other in a circle: {}. Move the piece they share into \
             a module below both (see ARCHITECTURE.md, \"Server layers\").",
            cycle.join(" -> ")
        );
    }
    // The layers ARCHITECTURE.md shows, printed for whoever updates it (`--nocapture`).
    let levels = layers(&g);
    let top = levels.values().copied().max().unwrap_or(0);
    for l in (0..=top).rev() {
        let at: Vec<&str> = levels
            .iter()
            .filter(|(_, v)| **v == l)
            .map(|(k, _)| k.as_str())
            .collect();
        println!("L{l}: {}", at.join(" "));
    }
    assert_eq!(
        levels.get("server"),
        Some(&top),
        "the listener is the top layer"
    );
}
