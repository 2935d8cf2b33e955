#!/bin/sh
# Provisioning of the kvmpod box (vagrant/Vagrantfile), also usable on any Debian 12 machine as root:
#   vagrant/provision.sh [REPO]    (default: the checkout this script is in)
# `make setup` installs the Debian packages, the venv, the agent, the guest kernels and kvmpod's QEMU;
# it is idempotent and does nothing costly when everything is there, so provisioning again
# (`vagrant provision`) is quick. Then `kvmpod doctor` says what the box offers (nested KVM or not).
set -eu

repo=${1:-$(cd "$(dirname "$0")/.." && pwd)}
[ "$(id -u)" = 0 ] || { echo "provision.sh: run as root (vagrant does)" >&2; exit 1; }
[ -f "$repo/Makefile" ] || { echo "provision.sh: $repo is not a kvmpod checkout" >&2; exit 1; }

# make itself, only when missing: everything else is the Makefile's (its `deps` target)
if ! command -v make >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends make >/dev/null
fi

# the box's KVM for the vagrant user too (tests and pods may run without root)
if [ -e /dev/kvm ] && getent group kvm >/dev/null && id vagrant >/dev/null 2>&1; then
    id -nG vagrant | grep -qw kvm || usermod -aG kvm vagrant
fi

cd "$repo"
make setup
# what this box offers; it fails only when pods cannot run at all (TCG is a note, not a failure)
.venv/bin/kvmpod doctor
