"""The rootfs disk: an image's rootfs packed into a read-only ISO 9660 + Rock Ridge disk image.

`entries_from_tar` / `entries_from_dir` turn an ACI's rootfs into a safe, validated stream of
`RootfsEntry` records (no extraction, no root needed); `build_iso` writes them into an ISO that the
guest mounts with Linux's isofs. See docs/disk.md for the format and the decisions behind it.

Nothing is re-exported here: the run path imports `entries` alone (cheap) and `iso` (pycdlib,
~40 ms) only when a disk has to be built.
"""
