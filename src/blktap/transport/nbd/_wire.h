/*
 * blktap/transport/nbd/_wire.h: the NBD protocol's numbers as they travel (big-endian,
 * at any alignment), for the transport's compiled passes (_inline.c, _handshake.c).
 */
#ifndef BLKTAP_NBD_WIRE_H
#define BLKTAP_NBD_WIRE_H

#include <endian.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t get16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static inline uint32_t get32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static inline uint64_t get64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }
static inline void put16(unsigned char *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static inline void put32(unsigned char *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static inline void put64(unsigned char *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }

#endif
