# kvmpod — `make demo` and `make test` are the contract (README.md). Everything they need is
# installed by `make setup`, which is idempotent and quick the second time.

PYTHON     ?= python3
VENV       := .venv
VPY        := $(VENV)/bin/python
KVMPOD     := $(VENV)/bin/kvmpod
STAMPS     := .stamps
BUILD      := build
DEB_PACKAGES := qemu-system-x86 qemu-utils cpio busybox-static musl-tools kmod gcc make python3-venv buildah gnupg gpgv \
                linux-source-6.1 build-essential flex bison bc libelf-dev xz-utils patch \
                dpkg-dev meson ninja-build pkg-config libglib2.0-dev libpixman-1-dev libslirp-dev libfdt-dev \
                libcap-ng-dev libattr1-dev libseccomp-dev \
                python3-build help2man zsh \
                podman conmon containerd runc netavark aardvark-dns containernetworking-plugins curl util-linux \
                libvirt-dev python3-dev \
                docker-registry skopeo openssl \
                clang libclang-rt-14-dev
PYTEST_ARGS ?=

.PHONY: setup deps venv bytecode agent generate kernel kernel-distro qemu initrd demo stage1 test unit bench restore-floor bench-deps bench-image bench-agent clean vagrant-deps libvirt-deps

# The per-machine builds are `kvmpod setup`'s (kvmpod/provision.py): the same path as for an installed kvmpod.
setup: deps libvirt-deps venv bytecode agent
	$(KVMPOD) setup

# Compiled once here: with PYTHONDONTWRITEBYTECODE set (as on CI runners), every kvmpod command
# would otherwise compile its ~60 modules again (~0.1 s each time).
bytecode: venv
	$(VPY) -m compileall -q kvmpod >/dev/null

# Debian packages: apt runs only when one is missing.
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing Debian packages:" $$missing; \
	  [ "$$(id -u)" = 0 ] || { echo "setup: run as root to install:" $$missing >&2; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_FLAGS) $$missing >/dev/null; \
	fi

venv: $(STAMPS)/venv
$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# compat: a plain path entry; the default editable finder costs every kvmpod command ~15 ms at start
	$(VPY) -m pip install -q --config-settings editable_mode=compat -e '.[test,libvirt]'
	@touch $@

agent:
	$(MAKE) -C guest-agent PYTHON=$(PYTHON)

# The agent protocol's checked-in generated files, from kvmpod/agent/protocol.toml: the host's messages
# (kvmpod/agent/messages.py) and the tables of docs/agent-protocol.md (the agent's build makes its own C
# files). tests/unit/test_protocol.py fails when they are stale.
generate:
	$(PYTHON) kvmpod/agent/gen_protocol.py kvmpod/agent/messages.py docs/agent-protocol.md

# kvmpod's own minimal kernel (the default; built from Debian's linux-source, ~6 min the first
# time, nothing when unchanged) and the Debian cloud kernel (the fallback). docs/kernel.md.
kernel: venv agent
	$(KVMPOD) setup --only minimal-kernel
kernel-distro: venv agent
	$(KVMPOD) setup --only distro-kernel

# kvmpod's own QEMU: Debian's qemu source package of the installed version, built with only the
# machines and devices pods use (~2 min the first time, nothing when unchanged). docs/qemu.md.
qemu: venv agent
	$(KVMPOD) setup --only qemu

initrd: setup
	$(VPY) -c 'from kvmpod.boot.initrd import build_initrd, find_agent; from kvmpod.boot.kernel import find_kernel; print(build_initrd(find_agent(), find_kernel()))'

$(BUILD)/busybox.aci: setup tests/make-busybox-rootfs.sh
	@mkdir -p $(BUILD)
	tests/make-busybox-rootfs.sh $(BUILD)/busybox-rootfs
	$(KVMPOD) image build --rootfs $(BUILD)/busybox-rootfs --name example.com/busybox --label version=1.0 \
	    --exec '/bin/sh -c "cat /etc/greeting; uname -sr"' -o $@

demo: $(BUILD)/busybox.aci
	$(KVMPOD) run --net user $(BUILD)/busybox.aci  # user-mode networking: the demo changes nothing on the host

# kvmpod as rkt's stage1: `rkt run --stage1-path=build/kvmpod-stage1.aci ...` (docs/stage1.md). Its
# entrypoints run this checkout's kvmpod (.venv), recorded in the ACI. Rebuilt every time: it is tiny.
stage1: venv
	$(VPY) -m kvmpod.stage1.build -o $(BUILD)/kvmpod-stage1.aci

# The libvirt backend (docs/libvirt.md): Debian's daemon (its QEMU user, qemu.conf, virtlogd) without the
# recommends (dnsmasq-base and the rest of a virtual-network host: kvmpod never uses libvirt's networks, and
# libvirt's default network, virbr0 with its NAT rules, is defined but never started). libvirt-python
# builds in the venv against libvirt-dev (DEB_PACKAGES).
LIBVIRT_DEB_PACKAGES := libvirt-daemon-system libvirt-clients
libvirt-deps:
	@$(MAKE) --no-print-directory deps DEB_PACKAGES='$(LIBVIRT_DEB_PACKAGES)' APT_FLAGS=--no-install-recommends

# vagrant/ (vagrant/README.md): `make test` runs `vagrant validate` on its Vagrantfile (the boxes themselves
# cannot be downloaded on CI machines), with Debian's vagrant and its libvirt provider plugin. Without the
# recommends: they are an NFS server (a service on the machine) and libguestfs-tools, which validate needs
# neither of (the box's folder is rsynced).
VAGRANT_DEB_PACKAGES := vagrant vagrant-libvirt
vagrant-deps:
	@$(MAKE) --no-print-directory deps DEB_PACKAGES='$(VAGRANT_DEB_PACKAGES)' APT_FLAGS=--no-install-recommends

test: setup stage1 vagrant-deps
	$(VPY) -m mypy
	$(VPY) -m pytest $(PYTEST_ARGS) tests

unit: venv
	$(VPY) -m pytest -m 'not vm' $(PYTEST_ARGS) tests

# All benchmarks, each against a baseline measured in the same run; writes bench/results/<date>.{json,png}.
# The image benchmark makes a Debian minbase with debootstrap once (root) and compares with xorriso;
# the OCI one compares with crun (Debian's default runtime) where it can run.
BENCH_DEB_PACKAGES := debootstrap xorriso crun
bench-deps:
	@$(MAKE) --no-print-directory deps DEB_PACKAGES='$(BENCH_DEB_PACKAGES)'

bench-image: venv bench-deps
	$(VPY) bench/image.py

# The agent transports: stdout throughput and exec latency per transport, against virtio-serial.
bench-agent: setup
	$(VPY) bench/agent.py

# The restore floor's harness (bench/restore_floor.c, run by bench/floor.py): C with the agent's generated
# protocol tables and encoder, built with the system cc.
RESTORE_FLOOR := $(BUILD)/bench/restore-floor
AGENT_GEN := guest-agent/build/messages.c guest-agent/build/messages.h guest-agent/build/protocol.h
restore-floor: agent $(RESTORE_FLOOR)
$(RESTORE_FLOOR): bench/restore_floor.c guest-agent/src/tlv.c guest-agent/src/util.c $(AGENT_GEN)
	@mkdir -p $(@D)
	cc -std=gnu11 -O2 -Wall -Wextra -Werror -D_GNU_SOURCE -Iguest-agent/build -Iguest-agent/src \
	   $(filter %.c,$^) -o $@

bench: setup bench-deps restore-floor
	$(VPY) -m pip install -q --config-settings editable_mode=compat -e '.[bench]'
	$(VPY) bench/run_all.py

clean:
	$(MAKE) -C guest-agent clean
	rm -rf $(BUILD) $(STAMPS) .pytest_cache

# A system install (docs/install.md): kvmpod in a venv of its own under PREFIX/lib/kvmpod, its console
# scripts linked into PREFIX/bin, the agent and relay, man pages, bash and zsh completion, a sample
# kvmpod.toml. DESTDIR stages it for a package. Then `kvmpod setup` builds the guest kernels and QEMU.
PREFIX  ?= /usr/local
DESTDIR ?=
INSTALL_PY := /usr/bin/python3
# What the install needs, what pods need (QEMU and its firmware, gpgv for signed images), and what
# `kvmpod setup` builds with (as kvmpod/provision.py lists them: one source of truth).
INSTALL_DEB_PACKAGES := python3-venv python3-build gcc musl-tools make help2man qemu-system-x86 gpgv
.PHONY: install uninstall install-deps
install-deps:
	@$(MAKE) --no-print-directory deps DEB_PACKAGES='$(INSTALL_DEB_PACKAGES) '"$$(cd / && PYTHONPATH=$(CURDIR) $(INSTALL_PY) -m kvmpod setup --list-packages)"
install: install-deps
	$(INSTALL_PY) packaging/install.py install --prefix '$(PREFIX)' --destdir '$(DESTDIR)'
uninstall:
	$(INSTALL_PY) packaging/install.py uninstall --prefix '$(PREFIX)' --destdir '$(DESTDIR)'
