"""The old qcow format (version 1), with blktap2's Xen extension header: read-only
(docs/formats/qcow.md)."""
