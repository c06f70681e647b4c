/* Platform primitives for pmq._journal, callable without the GIL.
 *
 * Owns: a mutex and condition variable, "make this file's data durable", positioned writes,
 * and little-endian loads/stores. Must not: allocate Python objects or touch the GIL.
 *
 * Durability per platform (docs/journal.md):
 *   Linux    fdatasync: data plus the metadata needed to read it back, then a device flush.
 *   macOS    fcntl(F_FULLFSYNC): plain fsync on macOS leaves data in the drive's cache; fall back
 *            to fsync only where the file system refuses F_FULLFSYNC (SMB, some FUSE).
 *   Windows  _commit (FlushFileBuffers).
 */
#ifndef PMQ_PLATFORM_H
#define PMQ_PLATFORM_H

#include <errno.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#ifdef _WIN32
#include <windows.h>
#include <io.h>

typedef SRWLOCK pmq_mutex_t;
typedef CONDITION_VARIABLE pmq_cond_t;

static inline void pmq_mutex_init(pmq_mutex_t *m) { InitializeSRWLock(m); }
static inline void pmq_mutex_destroy(pmq_mutex_t *m) { (void)m; }
static inline void pmq_mutex_lock(pmq_mutex_t *m) { AcquireSRWLockExclusive(m); }
static inline void pmq_mutex_unlock(pmq_mutex_t *m) { ReleaseSRWLockExclusive(m); }
static inline void pmq_cond_init(pmq_cond_t *c) { InitializeConditionVariable(c); }
static inline void pmq_cond_destroy(pmq_cond_t *c) { (void)c; }
static inline void pmq_cond_wait(pmq_cond_t *c, pmq_mutex_t *m) {
    SleepConditionVariableSRW(c, m, INFINITE, 0);
}
static inline void pmq_cond_broadcast(pmq_cond_t *c) { WakeAllConditionVariable(c); }
static inline void pmq_cond_signal(pmq_cond_t *c) { WakeConditionVariable(c); }

/* Windows has no pwrite. Only the journal's leader ever writes a segment, so seek + write on
 * its descriptor cannot interleave with another writer. */
static inline int64_t pmq_pwrite(int fd, const void *buf, size_t n, int64_t off) {
    if (_lseeki64(fd, off, SEEK_SET) < 0) return -1;
    unsigned int chunk = n > 0x40000000u ? 0x40000000u : (unsigned int)n;
    return (int64_t)_write(fd, buf, chunk);
}
static inline int pmq_datasync(int fd) { return _commit(fd); }

#else
#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

typedef pthread_mutex_t pmq_mutex_t;
typedef pthread_cond_t pmq_cond_t;

static inline void pmq_mutex_init(pmq_mutex_t *m) { pthread_mutex_init(m, NULL); }
static inline void pmq_mutex_destroy(pmq_mutex_t *m) { pthread_mutex_destroy(m); }
static inline void pmq_mutex_lock(pmq_mutex_t *m) { pthread_mutex_lock(m); }
static inline void pmq_mutex_unlock(pmq_mutex_t *m) { pthread_mutex_unlock(m); }
static inline void pmq_cond_init(pmq_cond_t *c) { pthread_cond_init(c, NULL); }
static inline void pmq_cond_destroy(pmq_cond_t *c) { pthread_cond_destroy(c); }
static inline void pmq_cond_wait(pmq_cond_t *c, pmq_mutex_t *m) { pthread_cond_wait(c, m); }
static inline void pmq_cond_broadcast(pmq_cond_t *c) { pthread_cond_broadcast(c); }
static inline void pmq_cond_signal(pmq_cond_t *c) { pthread_cond_signal(c); }

static inline int64_t pmq_pwrite(int fd, const void *buf, size_t n, int64_t off) {
    return (int64_t)pwrite(fd, buf, n, (off_t)off);
}

static inline int pmq_datasync(int fd) {
#if defined(__APPLE__)
    if (fcntl(fd, F_FULLFSYNC) == 0) return 0;
    if (errno == ENOTSUP || errno == EINVAL || errno == ENOTTY) return fsync(fd);
    return -1;
#elif defined(__linux__)
    return fdatasync(fd);
#else
    return fsync(fd);
#endif
}
#endif

static inline int pmq_errno(void) { return errno; }

static inline uint64_t pmq_load_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static inline uint32_t pmq_load_u32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint16_t pmq_load_u16(const unsigned char *p) {
    return (uint16_t)(p[0] | (p[1] << 8));
}
static inline void pmq_store_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) { p[i] = (unsigned char)(v & 0xff); v >>= 8; }
}
static inline void pmq_store_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) { p[i] = (unsigned char)(v & 0xff); v >>= 8; }
}
static inline void pmq_store_u16(unsigned char *p, uint16_t v) {
    p[0] = (unsigned char)(v & 0xff);
    p[1] = (unsigned char)(v >> 8);
}

#endif /* PMQ_PLATFORM_H */
