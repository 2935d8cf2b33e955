#!/bin/sh
# Make a small rootfs from Debian's busybox-static: the sample image of `make demo` and the tests.
# Usage: tests/make-busybox-rootfs.sh DIR
set -eu
dir=$1
busybox=${BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "make-busybox-rootfs: $busybox not found (apt-get install busybox-static)" >&2; exit 1; }
rm -rf "$dir"
mkdir -p "$dir/bin" "$dir/sbin" "$dir/usr/bin" "$dir/etc" "$dir/tmp" "$dir/root" "$dir/home/app" \
         "$dir/proc" "$dir/sys" "$dir/dev" "$dir/var/tmp"
cp "$busybox" "$dir/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$dir/bin/$applet"
done
chmod 1777 "$dir/tmp" "$dir/var/tmp"
cat > "$dir/etc/passwd" <<'PW'
root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PW
cat > "$dir/etc/group" <<'GR'
root:x:0:
app:x:1000:
extra:x:2000:app
nogroup:x:65534:
GR
chown 1000:1000 "$dir/home/app" 2>/dev/null || true
echo "Hello from a kvmpod VM!" > "$dir/etc/greeting"
