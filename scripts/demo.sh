#!/usr/bin/env bash
# Demo: three containers that talk to each other and to a local "upstream" netns
# standing in for the internet, watched by egress-top. Nothing leaves the machine:
# the TEST-NET prefixes get unreachable routes before anything else.
# Extra arguments go to egress-top (e.g. `scripts/demo.sh --json -n 5`).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=egress-top-test/busybox:1
NS=egress-demo-up
HOST_VETH=egdemo-up
NET=egress-demo
METRIC=4242

cleanup() {
  docker rm -f demo-web demo-api demo-worker >/dev/null 2>&1 || true
  docker network rm "$NET" >/dev/null 2>&1 || true
  ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  ip link del "$HOST_VETH" 2>/dev/null || true
  ip route del unreachable 198.51.100.0/24 metric "$METRIC" 2>/dev/null || true
  ip -6 route del unreachable 2001:db8::/32 metric "$METRIC" 2>/dev/null || true
}
trap cleanup EXIT
cleanup

# Safety first: if anything below fails, test prefixes still go nowhere.
ip route add unreachable 198.51.100.0/24 metric "$METRIC"
ip -6 route add unreachable 2001:db8::/32 metric "$METRIC"

# The upstream: a netns with a web server on 198.51.100.1 and a UDP listener on .2:53
ip netns add "$NS"
ip link add "$HOST_VETH" type veth peer name eth0 netns "$NS"
ip addr add 198.51.100.254/24 dev "$HOST_VETH"
ip link set "$HOST_VETH" up
ip -n "$NS" addr add 198.51.100.1/24 dev eth0
ip -n "$NS" addr add 198.51.100.2/24 dev eth0
ip -n "$NS" link set eth0 up
ip -n "$NS" link set lo up
ip -n "$NS" route add default via 198.51.100.254
mkdir -p /tmp/egress-demo-www && echo "hello from upstream" > /tmp/egress-demo-www/index.html
ip netns exec "$NS" timeout 3600 busybox httpd -f -p 198.51.100.1:80 -h /tmp/egress-demo-www &
ip netns exec "$NS" timeout 3600 python3 -c 'import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.51.100.2", 53))
while True:
    s.recv(2048)' &
sysctl -qw net.ipv4.ip_forward=1

docker network create "$NET" >/dev/null
# Every loop is bounded: an hour at most, then the containers exit on their own.
docker run -d --name demo-web --network "$NET" "$IMAGE" \
  sh -c 'mkdir -p /www && echo ok > /www/index.html && exec timeout 3600 httpd -f -p 80 -h /www' >/dev/null
docker run -d --name demo-api --network "$NET" "$IMAGE" \
  sh -c 'for i in $(seq 1 3600); do wget -q -O /dev/null http://demo-web/; wget -q -O /dev/null http://198.51.100.1/; sleep 1; done' >/dev/null
docker run -d --name demo-worker --network "$NET" "$IMAGE" \
  sh -c 'for i in $(seq 1 3600); do nslookup -timeout=1 jobs.demo.internal 198.51.100.2 >/dev/null 2>&1; ping -c 2 -W 1 198.51.100.1 >/dev/null; done' >/dev/null

echo "demo: containers demo-web, demo-api, demo-worker on network $NET; upstream netns $NS (198.51.100.1-2)"
.venv/bin/egress-top "$@"
