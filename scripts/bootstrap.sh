#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine for egress-top: system packages,
# bpffs, a running Docker engine, the virtualenv, the local test image.
# A second run does nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "setup: $*"; }
die() { echo "setup: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root: sudo make setup"

PACKAGES=(docker.io python3-bpfcc libbpfcc linux-headers-amd64 iproute2 busybox-static iperf3
          iptables nftables tmux python3-venv python3-pip procps kmod util-linux docker-compose gcc libc6-dev
          prometheus  # promtool and the server binary the metrics tests start themselves
          logrotate mmdebstrap)  # deploy tests: rotation of the --export file; the image's base
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "system packages present"
fi

if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs at /sys/fs/bpf"
  say "mounted bpffs"
fi

# Debian's docker.io client; /usr/local/bin may hold a client without an engine.
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=docker
if ! timeout 10 "$DOCKER" info >/dev/null 2>&1; then
  [ -z "${DOCKER_HOST:-}" ] || die "DOCKER_HOST=$DOCKER_HOST does not answer: start that engine or unset DOCKER_HOST"
  say "starting dockerd (log: /var/log/egress-top-dockerd.log)"
  # Close inherited descriptors above 2: a lock held by whoever called us (flock)
  # must not live on in the daemon for as long as it runs.
  setsid nohup bash -c 'for fd in /proc/self/fd/*; do n=${fd##*/}; [ "$n" -gt 2 ] && eval "exec $n>&-"; done; exec dockerd' \
    >/var/log/egress-top-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    timeout 5 "$DOCKER" info >/dev/null 2>&1 && break
    sleep 1
  done
  timeout 10 "$DOCKER" info >/dev/null 2>&1 || die "dockerd did not answer within 60 s: see /var/log/egress-top-dockerd.log"
fi
say "docker engine $("$DOCKER" version --format '{{.Server.Version}}')"

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  say "installing the project into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
  touch .venv/.installed
fi
# The project's own bytecode: an editable install compiles none of it, and where
# PYTHONDONTWRITEBYTECODE is set no start writes it either, so every start compiled ~60
# modules from source (egress-top beside an agent: 0.39 -> 0.37 s). Up-to-date files are skipped.
.venv/bin/python -m compileall -q -j 0 agent bpf bench >/dev/null

scripts/build-test-image.sh
say "ready"
