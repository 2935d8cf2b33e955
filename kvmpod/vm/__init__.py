"""Virtual machines: accelerator choice, the QEMU command line, and the backends that run a VM."""
