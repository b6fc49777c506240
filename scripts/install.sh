#!/usr/bin/env bash
# install|uninstall PREFIX: one wrapper in PREFIX/bin per console script of pyproject.toml
# ([project.scripts]), each exec'ing the entry point in this checkout's .venv, so
# `sudo egress-top` works from root's PATH. A file there that we did not write (it lacks
# the marker line) is never overwritten or removed.
set -euo pipefail
cd "$(dirname "$0")/.."

MARKER="# egress-top wrapper, written by 'make install'; 'make uninstall' removes it"
action=${1:?usage: scripts/install.sh install|uninstall PREFIX}
bin="${2:?usage: scripts/install.sh install|uninstall PREFIX}/bin"
repo=$(pwd -P)

die() { echo "make $action: $*" >&2; exit 1; }
ours() { [ -f "$1" ] && grep -qxF "$MARKER" "$1"; }

[ -x .venv/bin/python ] || scripts/bootstrap.sh  # a fresh clone: set up first
mapfile -t names < <(.venv/bin/python -c \
  'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["scripts"]))')

case "$action" in
install)
  # refuse before writing anything, so a refusal leaves no half-installed set
  for name in "${names[@]}"; do
    if [ -e "$bin/$name" ] || [ -L "$bin/$name" ]; then
      ours "$bin/$name" || die "$bin/$name exists and is not ours: remove or move it, then run again"
    fi
  done
  mkdir -p "$bin"
  for name in "${names[@]}"; do
    [ -x ".venv/bin/$name" ] || die ".venv/bin/$name is missing: run 'sudo make setup'"
    printf '#!/bin/sh\n%s\nexec %q "$@"\n' "$MARKER" "$repo/.venv/bin/$name" > "$bin/$name.tmp"
    chmod 755 "$bin/$name.tmp"
    mv -f "$bin/$name.tmp" "$bin/$name"
    echo "installed $bin/$name"
  done
  ;;
uninstall)
  for name in "${names[@]}"; do
    if ours "$bin/$name"; then
      rm -f "$bin/$name"
      echo "removed $bin/$name"
    elif [ -e "$bin/$name" ]; then
      echo "kept $bin/$name: not ours"
    fi
  done
  ;;
*) die "unknown action $action: use install or uninstall" ;;
esac
