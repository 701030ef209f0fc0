#!/usr/bin/env bash
# Builds the Debian package of Conclave and checks what it installs.
#
#   cargo install cargo-deb        # once (it takes a few minutes to build)
#   packaging/build-deb.sh         # -> target/debian/conclave_<version>-1_<arch>.deb
#
# .ci/run runs it after the tests (installing cargo-deb 3.8.0 when it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "build-deb: cargo-deb is not installed; run: cargo install cargo-deb" >&2
    exit 2
fi
if ! command -v dpkg-deb >/dev/null 2>&1; then
    echo "build-deb: dpkg-deb is missing (it comes with dpkg, on Debian and Ubuntu)" >&2
    exit 2
fi

cargo build --release -p conclave
bin=target/release/conclave

# Completions and man pages, from the same definitions as --help.
gen=packaging/generated
rm -rf "$gen"
mkdir -p "$gen/completions" "$gen/man"
"$bin" completions bash >"$gen/completions/conclave"
"$bin" completions zsh >"$gen/completions/_conclave"
"$bin" completions fish >"$gen/completions/conclave.fish"
"$bin" man "$gen/man" >/dev/null
gzip -9n "$gen"/man/*.1

# Stripped: the release profile keeps line tables for backtraces, which the package need not.
out=$(cargo deb -p conclave --no-build --strip)
deb=$(printf '%s\n' "$out" | grep '\.deb$' | tail -n 1)
if [ ! -f "$deb" ]; then
    echo "build-deb: cargo deb did not say where the package is:" >&2
    printf '%s\n' "$out" >&2
    exit 1
fi

# What it must install.
contents=$(dpkg-deb -c "$deb")
missing=0
for path in \
    ./usr/bin/conclave \
    ./lib/systemd/system/conclave.service \
    ./etc/conclave/conclave.toml \
    ./usr/share/bash-completion/completions/conclave \
    ./usr/share/zsh/vendor-completions/_conclave \
    ./usr/share/fish/vendor_completions.d/conclave.fish \
    ./usr/share/man/man1/conclave.1.gz \
    ./usr/share/man/man1/conclave-serve.1.gz \
    ./usr/share/man/man1/conclave-user-admin.1.gz; do
    if ! printf '%s\n' "$contents" | grep -q -- " $path\$"; then
        echo "build-deb: the package lacks $path" >&2
        missing=1
    fi
done
control=$(mktemp -d)
trap 'rm -rf "$control"' EXIT
dpkg-deb -e "$deb" "$control"
# The packaged binary runs, and its unit is the one in the tree.
dpkg-deb -x "$deb" "$control/root"
"$control/root/usr/bin/conclave" --version >/dev/null ||
    { echo "build-deb: the packaged binary does not run" >&2; missing=1; }
cmp -s "$control/root/lib/systemd/system/conclave.service" packaging/conclave.service ||
    { echo "build-deb: the packaged unit differs from packaging/conclave.service" >&2; missing=1; }
grep -qx /etc/conclave/conclave.toml "$control/conffiles" ||
    { echo "build-deb: conclave.toml is not a conffile" >&2; missing=1; }
[ -x "$control/postinst" ] || { echo "build-deb: no postinst (the conclave user)" >&2; missing=1; }
if [ "$missing" -ne 0 ]; then
    exit 1
fi
echo "build-deb: $deb: binary, unit, config, completions, man pages: all there"
