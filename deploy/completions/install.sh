#!/usr/bin/env bash
# Installs tokengate's shell completions and man pages, generated from the binary's own clap
# definitions (so they always match its flags). Used by deploy/docker/Dockerfile; run it by hand
# after installing the binary elsewhere:
#   sudo deploy/completions/install.sh /usr/bin/tokengate          # into /usr/share
#   deploy/completions/install.sh ./target/release/tokengate "$PWD/out"   # into out/share/...
set -euo pipefail
bin="${1:-tokengate}"
prefix="${2:-/usr}"
install -d "$prefix/share/bash-completion/completions" \
    "$prefix/share/zsh/vendor-completions" \
    "$prefix/share/fish/vendor_completions.d" \
    "$prefix/share/man/man1"
"$bin" completions bash > "$prefix/share/bash-completion/completions/tokengate"
"$bin" completions zsh > "$prefix/share/zsh/vendor-completions/_tokengate"
"$bin" completions fish > "$prefix/share/fish/vendor_completions.d/tokengate.fish"
"$bin" man --dir "$prefix/share/man/man1"
gzip -9nf "$prefix"/share/man/man1/tokengate*.1
echo "installed completions (bash, zsh, fish) and man pages under $prefix/share"
