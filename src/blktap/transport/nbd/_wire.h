/*
 * blktap/transport/nbd/_wire.h: the wire as the transport's compiled passes (_inline.c,
 * _handshake.c) see it: the NBD protocol's numbers as they travel (big-endian, at any
 * alignment), and a send that never waits.
 */
#ifndef BLKTAP_NBD_WIRE_H
#define BLKTAP_NBD_WIRE_H

#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>

static inline uint16_t get16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static inline uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static inline uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
static inline void put16(unsigned char *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static inline void put32(unsigned char *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static inline void put64(unsigned char *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }

/* Send buf[*sent:end] without waiting (*sent: how far it got). 0: all of it left; 1: the
 * socket is full (what is left is the caller's to queue); -errno: the connection broke. */
static int send_now(int sock, const unsigned char *buf, size_t *sent, size_t end)
{
    while (*sent < end) {
        ssize_t n = send(sock, buf + *sent, end - *sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 1;
            return -errno;
        }
        *sent += (size_t)n;
    }
    return 0;
}

#endif
