#!/bin/sh
# Writes an empty `fn main() {}` stub for every target source file that
# Cargo.toml declares (and for src/main.rs, src/lib.rs), so the Dockerfile's
# dependency layer can run `cargo build` before any of our code is copied.
# Cargo refuses a manifest whose declared targets ([[bin]], [[bench]],
# [[test]], [[example]], [lib]) have no source file, so all are stubbed.
#
# usage: cargo-stubs.sh [Cargo.toml]     (prints the stubbed paths)
set -eu
manifest=${1:-Cargo.toml}
package=$(awk '
  /^\[package\]/ { p = 1; next }
  /^\[/          { p = 0 }
  p && /^[[:space:]]*name[[:space:]]*=/ { v = $0; sub(/^[^"]*"/, "", v); sub(/".*/, "", v); print v; exit }
' "$manifest")

paths=$(awk -v pkg="$package" '
  function flush(   dir) {
    if (kind == "") return
    if (path == "") {
      if (kind == "lib") path = "src/lib.rs"
      else if (kind == "bin" && (name == pkg || name == "")) path = "src/main.rs"
      else {
        dir = (kind == "bin") ? "src/bin" : (kind == "bench") ? "benches" : (kind == "test") ? "tests" : "examples"
        path = dir "/" name ".rs"
      }
    }
    print path
    kind = ""; name = ""; path = ""
  }
  /^\[\[(bin|bench|test|example)\]\]/ { flush(); kind = $0; gsub(/[][[:space:]]/, "", kind); next }
  /^\[lib\]/                          { flush(); kind = "lib"; next }
  /^\[/                               { flush(); next }
  kind != "" && /^[[:space:]]*name[[:space:]]*=/ { name = $0; sub(/^[^"]*"/, "", name); sub(/".*/, "", name) }
  kind != "" && /^[[:space:]]*path[[:space:]]*=/ { path = $0; sub(/^[^"]*"/, "", path); sub(/".*/, "", path) }
  END { flush() }
' "$manifest")

for f in src/main.rs src/lib.rs $paths; do
  mkdir -p "$(dirname "$f")"
  printf 'fn main() {}\n' > "$f"
  echo "$f"
done
