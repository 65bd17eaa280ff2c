#!/usr/bin/env bash
# Builds the Debian package target/debian/sendguard_VERSION-REVISION_ARCH.deb
# with cargo-deb: the release binary, the man pages and completion scripts
# generated from it, /etc/sendguard/config.toml from config.toml.example,
# and the systemd unit and maintainer scripts in packaging/debian/.
#
# Installs cargo-deb from crates.io when it is missing or another version.
# Arguments go to cargo deb, such as `--deb-revision 2`. Prints the paths of
# the package and of its sendguard-dbgsym package (.ddeb) on standard output.
set -euo pipefail

# The version whose [package.metadata.deb] keys Cargo.toml is written for.
CARGO_DEB_VERSION=3.8.0

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

if [[ $(cargo deb --version 2>/dev/null || true) != *" $CARGO_DEB_VERSION"* ]]; then
    echo "build-deb: installing cargo-deb $CARGO_DEB_VERSION from crates.io" >&2
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" >&2
fi

echo "build-deb: building sendguard in release mode" >&2
cargo build --release --locked >&2

# cargo-deb takes target/release/ to mean the real target directory, and
# the generated files are listed in Cargo.toml under target/generated/.
binary="${CARGO_TARGET_DIR:-$repo/target}/release/sendguard"
generated="$repo/target/generated"
rm -rf "$generated"
mkdir -p "$generated/man" "$generated/completions"
"$binary" generate man "$generated/man" > /dev/null
"$binary" generate completions bash > "$generated/completions/sendguard.bash"
"$binary" generate completions zsh > "$generated/completions/_sendguard"
"$binary" generate completions fish > "$generated/completions/sendguard.fish"
echo "build-deb: generated $(ls "$generated/man" | wc -l) man pages and 3 completion scripts" >&2

cargo deb --no-build --locked "$@"
