#!/bin/sh
# Creates a stub source file for every build target Cargo.toml declares (bins,
# lib, benches, tests, examples), so that the Dockerfile can build and cache
# the dependencies before the real sources are copied in. Existing files are
# left alone. Run in the directory holding Cargo.toml. POSIX sh + awk only.
set -eu
[ -f Cargo.toml ] || { echo "stub-targets: no Cargo.toml here" >&2; exit 1; }

awk '
function val(line) {
    if (match(line, /"[^"]*"/)) return substr(line, RSTART + 1, RLENGTH - 2)
    return ""
}
function flush(p) {
    if (kind == "") return
    p = path
    if (p == "") {
        if (kind == "lib") p = "src/lib.rs"
        else if (kind == "bin") p = (name == "" || name == pkg) ? "src/main.rs" : "src/bin/" name ".rs"
        else if (kind == "bench") p = "benches/" name ".rs"
        else if (kind == "test") p = "tests/" name ".rs"
        else if (kind == "example") p = "examples/" name ".rs"
    }
    print kind, p
    kind = ""; name = ""; path = ""
}
/^[ \t]*\[/ {
    flush()
    section = $0
    gsub(/[ \t]/, "", section)
    if (section == "[lib]") kind = "lib"
    else if (section == "[[bin]]") kind = "bin"
    else if (section == "[[bench]]") kind = "bench"
    else if (section == "[[test]]") kind = "test"
    else if (section == "[[example]]") kind = "example"
    next
}
section == "[package]" && /^[ \t]*name[ \t]*=/ { pkg = val($0) }
kind != "" && /^[ \t]*name[ \t]*=/ { name = val($0) }
kind != "" && /^[ \t]*path[ \t]*=/ { path = val($0) }
END { flush(); print "bin src/main.rs"; print "lib src/lib.rs" }
' Cargo.toml | while read -r kind path; do
    [ -e "$path" ] && continue
    mkdir -p "$(dirname "$path")"
    if [ "$kind" = lib ]; then : > "$path"; else echo 'fn main() {}' > "$path"; fi
    echo "stub-targets: $kind $path"
done
