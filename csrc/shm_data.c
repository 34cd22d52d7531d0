/*
 * shm_data.c -- shared-memory transport, data part: the data segment (two
 * buffers, replaced by a bigger one on reserve), the per-event publish /
 * fetch / ack of shm.h's protocol with their tags, and the all-gather of
 * small records through the control segment.  Waits and barriers come from
 * shm_live.c and shm.c through shm_internal.h.
 *
 * Pure C (POSIX shm + C11 atomics); never includes Python.h.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include "shm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

/* The shm name of data segment generation `gen`. */
static void data_name(const ad_shm *h, uint64_t gen, char *buf, size_t len)
{
    snprintf(buf, len, "%s-d%llu", h->name, (unsigned long long)gen);
}

/* Map data segment `dname` of `len` bytes; fd is closed afterwards. */
static ad_status map_data(int fd, const char *dname, size_t len, void **out,
                          ad_err *err)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        return ad_err_sys(err, e, NULL, "mmap(\"%s\", %zu) failed: %s", dname,
                          len, strerror(e));
    }
    *out = p;
    return AD_OK;
}

/* Rank 0's part: new segment, old contents copied, header updated. */
static ad_status reserve_create(ad_shm *h, uint64_t gen, size_t cap,
                                const char *dname, void **out, ad_err *err)
{
    ad_status st;
    size_t len = 2 * cap;
    unsigned char *p = NULL;
    int fd = shm_open(dname, O_RDWR | O_CREAT | O_EXCL, 0600);

    if (fd < 0) {
        int e = errno;
        return ad_err_sys(err, e, NULL, "shm_open(\"%s\", O_CREAT|O_EXCL) "
                          "failed: %s", dname, strerror(e));
    }
    if (ftruncate(fd, (off_t)len) != 0) {
        int e = errno;
        st = ad_err_sys(err, e, NULL, "ftruncate(\"%s\", %zu) failed: %s",
                        dname, len, strerror(e));
        goto done;
    }
    /* Reserve the pages now: on a small tmpfs (a container's default
     * /dev/shm is 64 MiB) a plain ftruncate would succeed and the first
     * memcpy past the limit would kill the process with SIGBUS. */
    {
        int rc = posix_fallocate(fd, 0, (off_t)len);
        if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL) {
            st = ad_err_sys(err, rc, NULL,
                            "posix_fallocate(\"%s\", %zu) failed: %s (is "
                            "/dev/shm too small?)", dname, len, strerror(rc));
            goto done;
        }
    }
    st = map_data(fd, dname, len, (void **)&p, err);
    if (st != AD_OK)
        goto done;
    /* Keep both old buffers' contents (events published before the reserve
     * may still be fetched after it).  Every rank is inside the reserve,
     * so nobody writes them now. */
    if (h->data != NULL) {
        memcpy(p, h->data, h->cap);
        memcpy(p + cap, h->data + h->cap, h->cap);
    }
    atomic_store_explicit(&hdr_of(h)->data_cap, (uint64_t)cap,
                          memory_order_relaxed);
    atomic_store_explicit(&hdr_of(h)->data_gen, gen, memory_order_release);
    *out = p;
done:
    close(fd);
    if (st != AD_OK)
        shm_unlink(dname);
    return st;
}

/* Other ranks: wait for rank 0's new segment and map it. */
static ad_status reserve_open(ad_shm *h, uint64_t gen, size_t cap,
                              const char *dname, double timeout_s, void **out,
                              ad_err *err)
{
    ad_status st;
    wait_spec w;
    uint64_t their_cap;
    int fd;
    struct stat sb;

    w.kind = W_DATAGEN;
    w.target = gen;
    w.only = 0;
    st = ad_shm_wait_for(h, &w, timeout_s, "reserve", err);
    if (st != AD_OK)
        return st;
    their_cap = atomic_load_explicit(&hdr_of(h)->data_cap,
                                     memory_order_relaxed);
    if (atomic_load_explicit(&hdr_of(h)->data_gen, memory_order_relaxed) !=
            gen || their_cap != (uint64_t)cap)
        return AD_INVALID(err, "bytes",
                          "reserve: ranks disagree: rank %d asked for %zu-byte "
                          "buffers, rank 0 made %llu-byte buffers (every rank "
                          "must reserve the same sizes in the same order)",
                          h->rank, cap, (unsigned long long)their_cap);
    fd = shm_open(dname, O_RDWR, 0);
    if (fd < 0) {
        int e = errno;
        return ad_err_sys(err, e, NULL, "shm_open(\"%s\") failed: %s", dname,
                          strerror(e));
    }
    if (fstat(fd, &sb) != 0 || (size_t)sb.st_size < 2 * cap) {
        int e = errno;
        st = ad_err_set(err, AD_EINTERNAL, NULL,
                        "data segment \"%s\" is %lld bytes, expected %zu "
                        "(errno %d)", dname, (long long)sb.st_size, 2 * cap, e);
        goto done;
    }
    st = map_data(fd, dname, 2 * cap, out, err);
done:
    close(fd);
    return st;
}

ad_status ad_shm_reserve(ad_shm *h, size_t bytes, double timeout_s,
                         ad_err *err)
{
    ad_status st;
    size_t cap;
    uint64_t gen;
    void *p = NULL;
    char dname[AD_SHM_MAX_NAME + 32];

    if ((st = ad_shm_check_handle(h, err)) != AD_OK)
        return st;
    if ((st = ad_shm_check_timeout(timeout_s, err)) != AD_OK)
        return st;
    /* Fast path, decided alike on every rank (same history, same bytes). */
    if (bytes <= h->cap)
        return AD_OK;
    if (bytes > (SIZE_MAX / 2 - 64) || bytes > (size_t)(INT64_MAX / 4))
        return ad_err_set(err, AD_ENOMEM, "bytes",
                          "reserve: %zu bytes per buffer is too large", bytes);
    cap = (bytes + 63) & ~(size_t)63;
    gen = h->gen + 1;
    data_name(h, gen, dname, sizeof dname);

    /* 1. Everyone is here: no rank reads or writes the old buffers. */
    st = ad_shm_enter_barrier(h, timeout_s, "reserve", err);
    if (st != AD_OK)
        goto error;

    /* 2. Rank 0 makes the segment; the others map it. */
    if (h->rank == 0)
        st = reserve_create(h, gen, cap, dname, &p, err);
    else
        st = reserve_open(h, gen, cap, dname, timeout_s, &p, err);
    if (st != AD_OK)
        goto error;
    if (h->data != NULL)
        munmap(h->data, h->data_len);
    h->data = p;
    h->data_len = 2 * cap;
    h->cap = cap;
    h->gen = gen;

    /* 3. Everyone mapped it: the name can go.  Every rank removes it (one
     * syscall, normally ENOENT), so that it goes even if rank 0 is killed
     * right after this barrier. */
    st = ad_shm_enter_barrier(h, timeout_s, "reserve", err);
    shm_unlink(dname);
    if (st != AD_OK)
        goto error;
    return AD_OK;

error:
    /* Whoever made the name, and whenever this failed, the name must not
     * outlive the reserve: every rank removes it (harmless if it is gone
     * or was never made), so a rank 0 killed midway leaves nothing in
     * /dev/shm.  The ranks may now disagree about the buffers: this handle
     * is done for, and peers waiting on us learn it at once, with why. */
    shm_unlink(dname);
    ad_shm_fail(h, err != NULL ? err->msg : NULL);
    return st;
}

size_t ad_shm_capacity(const ad_shm *h)
{
    return h != NULL ? h->cap : 0;
}

static ad_status check_items(const ad_shm *h, const ad_shm_item *items,
                             size_t n, ad_err *err)
{
    size_t i;
    if (n > 0 && items == NULL)
        return AD_INVALID(err, "items", "items is NULL but n=%zu", n);
    for (i = 0; i < n; i++) {
        const ad_shm_item *it = &items[i];
        if (it->nbytes == 0)
            continue;
        if (it->ptr == NULL)
            return AD_INVALID(err, "items", "items[%zu].ptr is NULL", i);
        if (it->offset > h->cap || it->nbytes > h->cap - it->offset)
            return AD_INVALID(err, "items",
                              "items[%zu] (offset %zu, %zu bytes) does not fit "
                              "in the %zu-byte buffer (call reserve first)",
                              i, it->offset, it->nbytes, h->cap);
    }
    return AD_OK;
}

static unsigned char *buffer_of(const ad_shm *h, uint64_t seq)
{
    return h->data + (size_t)(seq & 1u) * h->cap;
}

ad_status ad_shm_publish(ad_shm *h, uint64_t seq, uint64_t tag,
                         const ad_shm_item *items, size_t n, double timeout_s,
                         ad_err *err)
{
    ad_status st;
    unsigned char *buf;
    size_t i;
    shm_slot *me;

    if ((st = ad_shm_check_handle(h, err)) != AD_OK)
        return st;
    if ((st = ad_shm_check_timeout(timeout_s, err)) != AD_OK)
        return st;
    if (seq == 0 || seq == UINT64_MAX)
        return AD_INVALID(err, "seq", "seq must be >= 1, got %llu",
                          (unsigned long long)seq);
    if (seq <= h->last_pub)
        return AD_INVALID(err, "seq",
                          "rank %d already published event %llu; events must "
                          "be published in increasing order (got %llu)",
                          h->rank, (unsigned long long)h->last_pub,
                          (unsigned long long)seq);
    if ((st = check_items(h, items, n, err)) != AD_OK)
        return st;

    me = slot_of(h, h->rank);
    /* Publishing seq means we are done with event seq-1 as a reader. */
    shm_raise_counter(&me->ack, seq - 1);

    /* Buffer seq%2 last held event seq-2: wait until everyone read it. */
    if (seq >= 3) {
        wait_spec w;
        w.kind = W_ACK;
        w.target = seq - 2;
        w.only = -1;
        st = ad_shm_wait_for(h, &w, timeout_s, "publish", err);
        if (st != AD_OK)
            return st;
    }

    /* check_items let a non-empty item through only if cap > 0, i.e. only
     * if the data segment is mapped. */
    buf = h->data != NULL ? buffer_of(h, seq) : NULL;
    for (i = 0; i < n; i++)
        if (items[i].nbytes > 0)
            memcpy(buf + items[i].offset, items[i].ptr, items[i].nbytes);
    atomic_store_explicit(&me->wrote[seq & 1u], seq, memory_order_relaxed);
    atomic_store_explicit(&me->tag[seq & 1u], tag, memory_order_relaxed);
    /* Release: a reader that sees published >= seq sees the bytes, wrote
     * and tag above. */
    atomic_store_explicit(&me->published, seq, memory_order_release);
    h->last_pub = seq;
    return AD_OK;
}

/* The ranks disagree about what event seq is: say so in the words of the
 * pipeline (tag = pipeline call << 32 | denoiser call k) and mark this rank
 * failed with the same words, so that every peer learns it at once. */
static ad_status out_of_step(ad_shm *h, uint64_t seq, int src, uint64_t sent,
                             uint64_t expected, ad_err *err)
{
    char msg[AD_SHM_MAX_ERROR + 1];
    snprintf(msg, sizeof msg,
             "exchange out of step: rank %d sent event %llu as pipeline call "
             "%llu, denoiser call %llu; rank %d expected pipeline call %llu, "
             "denoiser call %llu (the ranks were given different arguments)",
             src, (unsigned long long)seq, (unsigned long long)(sent >> 32),
             (unsigned long long)(sent & UINT64_C(0xffffffff)), h->rank,
             (unsigned long long)(expected >> 32),
             (unsigned long long)(expected & UINT64_C(0xffffffff)));
    ad_shm_fail(h, msg);
    return ad_err_set(err, AD_ESTATE, NULL, "%s", msg);
}

ad_status ad_shm_fetch(ad_shm *h, uint64_t seq, int src, uint64_t tag,
                       const ad_shm_item *items, size_t n, double timeout_s,
                       ad_err *err)
{
    ad_status st;
    const unsigned char *buf;
    size_t i;
    wait_spec w;
    uint64_t wrote, sent;

    if ((st = ad_shm_check_handle(h, err)) != AD_OK)
        return st;
    if ((st = ad_shm_check_timeout(timeout_s, err)) != AD_OK)
        return st;
    if (seq == 0 || seq == UINT64_MAX)
        return AD_INVALID(err, "seq", "seq must be >= 1, got %llu",
                          (unsigned long long)seq);
    if (src < 0 || src >= h->world)
        return AD_INVALID(err, "src", "src must be in 0..%d, got %d",
                          h->world - 1, src);
    if ((st = check_items(h, items, n, err)) != AD_OK)
        return st;

    w.kind = W_PUBLISHED;
    w.target = seq;
    w.only = src;
    st = ad_shm_wait_for(h, &w, timeout_s, "fetch", err);
    if (st != AD_OK)
        return st;
    /* published >= seq also holds when src skipped seq and went on: the
     * buffer would then hold older bytes.  src cannot have overwritten seq
     * with seq+2 yet (that waits for our acknowledgement of seq). */
    wrote = atomic_load_explicit(&slot_of(h, src)->wrote[seq & 1u],
                                 memory_order_relaxed);
    if (wrote != seq)
        return ad_err_set(err, AD_ESTATE, "seq",
                          "fetch: rank %d never published event %llu (it "
                          "went from event %llu to %llu)", src,
                          (unsigned long long)seq,
                          (unsigned long long)wrote,
                          (unsigned long long)atomic_load_explicit(
                              &slot_of(h, src)->published,
                              memory_order_relaxed));
    sent = atomic_load_explicit(&slot_of(h, src)->tag[seq & 1u],
                                memory_order_relaxed);
    if (sent != tag)
        return out_of_step(h, seq, src, sent, tag, err);

    buf = h->data != NULL ? buffer_of(h, seq) : NULL;
    for (i = 0; i < n; i++)
        if (items[i].nbytes > 0)
            memcpy(items[i].ptr, buf + items[i].offset, items[i].nbytes);
    return AD_OK;
}

void ad_shm_ack(ad_shm *h, uint64_t seq)
{
    if (h == NULL || h->ctl == NULL || !h->attached)
        return;
    shm_raise_counter(&slot_of(h, h->rank)->ack, seq);
}

/*
 * All-gather: round r (counted alike on every rank) writes our record into
 * area r % 2 of our record block, enters a barrier (whose release store
 * publishes the record), then reads every rank's area r % 2.  A rank can
 * only write area r % 2 again in round r + 2, after leaving round r + 1's
 * barrier, which needs every rank to have entered it, i.e. to be done
 * reading round r: no rank overwrites a record someone still reads.
 */
ad_status ad_shm_allgather(ad_shm *h, const void *mine, size_t n, void *all,
                           size_t *lens, double timeout_s, ad_err *err)
{
    ad_status st;
    shm_gather *g;
    uint64_t round;
    int r;

    if ((st = ad_shm_check_handle(h, err)) != AD_OK)
        return st;
    if ((st = ad_shm_check_timeout(timeout_s, err)) != AD_OK)
        return st;
    if (n > AD_SHM_MAX_RECORD)
        return AD_INVALID(err, "record", "record must be at most %d bytes, "
                          "got %zu", AD_SHM_MAX_RECORD, n);
    if (n > 0 && mine == NULL)
        return AD_INVALID(err, "record", "record is NULL but n=%zu", n);
    if (all == NULL || lens == NULL)
        return AD_INVALID(err, "all", "output arrays are NULL");

    round = ++h->ngather;
    g = &record_of(h, h->rank)->gather[round & 1u];
    if (n > 0)
        memcpy(g->data, mine, n);
    g->len = n;
    g->round = round;
    st = ad_shm_enter_barrier(h, timeout_s, "allgather", err);
    if (st != AD_OK)
        return st;
    for (r = 0; r < h->world; r++) {
        const shm_gather *o = &record_of(h, r)->gather[round & 1u];
        uint64_t len = o->len;
        if (o->round != round || len > AD_SHM_MAX_RECORD) {
            char msg[AD_SHM_MAX_ERROR + 1];
            snprintf(msg, sizeof msg,
                     "allgather: ranks out of step: rank %d entered "
                     "all-gather %llu but rank %d's record is from all-gather "
                     "%llu (every rank must make the same barrier, reserve "
                     "and allgather calls in the same order)", h->rank,
                     (unsigned long long)round, r,
                     (unsigned long long)o->round);
            ad_shm_fail(h, msg);
            return ad_err_set(err, AD_ESTATE, NULL, "%s", msg);
        }
        memcpy((unsigned char *)all + (size_t)r * AD_SHM_MAX_RECORD, o->data,
               (size_t)len);
        lens[r] = (size_t)len;
    }
    return AD_OK;
}
