#!/usr/bin/env bash
# The local image tests and the demo use: Debian's static busybox and nothing else.
# No registry is reachable here, so it is imported from a rootfs, never pulled.
set -euo pipefail
IMAGE=egress-top-test/busybox:1
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=docker

if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "setup: image $IMAGE present"
  exit 0
fi
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs"/{bin,etc,tmp,www}
cp /bin/busybox "$rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done
echo "root:x:0:0:root:/:/bin/sh" > "$rootfs/etc/passwd"
echo "root:x:0:" > "$rootfs/etc/group"
chmod 1777 "$rootfs/tmp"
tar -C "$rootfs" -c . | "$DOCKER" import --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin' - "$IMAGE" >/dev/null
echo "setup: built image $IMAGE"
