//! The web client's files, embedded at compile time by `build.rs` from `web/dist/`.

/// One embedded file.
pub struct Asset {
    /// The URL path without its leading slash (`index.html`, `assets/app-1234.js`).
    pub path: &'static str,
    pub content_type: &'static str,
    pub bytes: &'static [u8],
    /// SHA-256 of `bytes`, lower-case hex (also the ETag).
    pub sha256: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));

/// The SHA-256 of the embedded bundle: of the `sha256sum` listing of `web/dist/` (every file,
/// sorted by path), lower-case hex. `conclave doctor` prints it and `/about.json` serves it.
pub fn bundle_sha256() -> &'static str {
    BUNDLE_SHA256
}

/// Whether the real web client is embedded (false: the page that says how to build it).
pub fn built() -> bool {
    BUILT
}

/// The file for a URL path (`/` is `index.html`).
pub fn find(path: &str) -> Option<&'static Asset> {
    let path = path.trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    ASSETS.iter().find(|a| a.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_is_always_embedded_and_hashes_are_consistent() {
        let index = find("/").expect("an index page is always embedded");
        assert!(index.content_type.starts_with("text/html"));
        assert_eq!(bundle_sha256().len(), 64);
        for a in ASSETS {
            use sha2::Digest;
            assert_eq!(
                a.sha256,
                hex::encode(sha2::Sha256::digest(a.bytes)),
                "{}",
                a.path
            );
        }
        // The bundle hash is the SHA-256 of the sha256sum listing.
        let listing: String = ASSETS
            .iter()
            .map(|a| format!("{}  {}\n", a.sha256, a.path))
            .collect();
        use sha2::Digest;
        assert_eq!(
            bundle_sha256(),
            hex::encode(sha2::Sha256::digest(listing.as_bytes()))
        );
        assert!(find("/nothing-here.js").is_none());
    }
}
