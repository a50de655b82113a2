"""A disk as a host block device (kernel NBD over generic netlink): docs/attach.md."""
