"""kvmpod as an OCI runtime (`kvmpod-oci`): podman and containerd run each container in its own kvmpod VM.

cli (the runc command line) → container (create/start/state/kill/pause/resume/delete) and execute
(exec), over records (the per-container state under --root), bundle (config.json → the pod),
console (the --console-socket pty) and runtime_log (--log, --log-format). The pod itself is
kvmpod's own (kvmpod/pod/): an app rooted in the bundle's rootfs directory over virtio-fs.
docs/oci-runtime.md.
"""
