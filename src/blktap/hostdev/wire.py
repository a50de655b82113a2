"""Wire structures and numbers of the kernel interfaces ``blktap attach`` speaks:
netlink (``linux/netlink.h``), generic netlink and its controller (``linux/genetlink.h``)
and the kernel NBD client's generic netlink family (``linux/nbd-netlink.h``). Netlink
numbers are in host byte order."""

from __future__ import annotations

import struct

NETLINK_GENERIC = 16

NLMSG_HDR = struct.Struct("=IHHII")  # len type flags seq pid
GENL_HDR = struct.Struct("=BBH")  # cmd version reserved
NLA_HDR = struct.Struct("=HH")  # len type
NLMSG_ERROR_BODY = struct.Struct("=i")  # error (negative errno, 0 = ack), then the request

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLA_F_NESTED = 1 << 15
NLA_TYPE_MASK = ~((1 << 15) | (1 << 14)) & 0xFFFF

# The generic netlink controller.
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2

# The kernel NBD client's family.
NBD_FAMILY = "nbd"
NBD_GENL_VERSION = 1
NBD_CMD_CONNECT = 1
NBD_CMD_DISCONNECT = 2
NBD_CMD_RECONFIGURE = 3
NBD_CMD_STATUS = 5
NBD_ATTR_INDEX = 1
NBD_ATTR_SIZE_BYTES = 2
NBD_ATTR_BLOCK_SIZE_BYTES = 3
NBD_ATTR_TIMEOUT = 4
NBD_ATTR_SERVER_FLAGS = 5
NBD_ATTR_CLIENT_FLAGS = 6
NBD_ATTR_SOCKETS = 7
NBD_ATTR_DEAD_CONN_TIMEOUT = 8
NBD_ATTR_DEVICE_LIST = 9
NBD_ATTR_BACKEND_IDENTIFIER = 10
NBD_SOCK_ITEM = 1
NBD_SOCK_FD = 1
NBD_DEVICE_ITEM = 1
NBD_DEVICE_INDEX = 1
NBD_DEVICE_CONNECTED = 2
NBD_CFLAG_DESTROY_ON_DISCONNECT = 1 << 0
NBD_CFLAG_DISCONNECT_ON_CLOSE = 1 << 1

U16 = struct.Struct("=H")
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")
