"""kvmpod's userspace vsock: a vhost-user-vsock device backend for hosts without /dev/vhost-vsock.

vhost_user  the vhost-user protocol (QEMU is the front-end), the memory table, the rings' set-up
virtqueue   guest memory and split virtqueues, every guest-provided index, address and length checked
device      virtio-vsock packets, connections, credit, the Firecracker-style unix socket front
docs/vsock.md specifies it.
"""
