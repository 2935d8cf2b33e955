"""kvmpod: run App Container images, each in its own lightweight QEMU/KVM virtual machine."""

__version__ = "0.1.0"
