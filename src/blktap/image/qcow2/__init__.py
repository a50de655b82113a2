"""qcow2 images (qemu's copy-on-write format, versions 2 and 3): docs/formats/qcow2.md."""
