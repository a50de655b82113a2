"""tapback: the XenStore side of the user-space Xen block backend.

``xs_wire`` (the wire structures), ``xenstore`` (an asyncio client for xenstored's socket or
/dev/xen/xenbus), ``vbd`` (the state machine of one virtual block device), ``daemon`` (the
watches over every VBD of a backend type) and ``hotplug`` (the xl hotplug script's logic).
"""
