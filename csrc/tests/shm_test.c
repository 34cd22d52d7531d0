/*
 * shm_test.c -- the shared part of the test_shm program (shm_test.h):
 * names, patterns, the fork harness and the failure checks.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif

#include "shm_test.h"

#include <dirent.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int g_name_counter;
static char g_prefix[64]; /* "asyncdiff-test-<pid>-" (as listed in /dev/shm) */

void shm_test_init(void)
{
    snprintf(g_prefix, sizeof g_prefix, "asyncdiff-test-%d-", (int)getpid());
}

void nap_us(long us)
{
    struct timespec ts;
    ts.tv_sec = us / 1000000;
    ts.tv_nsec = (us % 1000000) * 1000;
    nanosleep(&ts, NULL);
}

/* splitmix64: a tiny, good-enough generator for sizes and byte patterns. */
uint64_t mix64(uint64_t *state)
{
    uint64_t z = (*state += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

uint64_t key4(uint64_t a, uint64_t b, uint64_t c, uint64_t d)
{
    uint64_t s = a;
    s = mix64(&s) ^ b;
    s = mix64(&s) ^ c;
    s = mix64(&s) ^ d;
    return mix64(&s);
}

/* The bytes item (seq, rank, item) of a run must hold. */
void fill_pattern(unsigned char *dst, size_t len, uint64_t key)
{
    uint64_t s = key, v;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        v = mix64(&s);
        memcpy(dst + i, &v, 8);
    }
    if (i < len) {
        v = mix64(&s);
        memcpy(dst + i, &v, len - i);
    }
}

void make_name(char *buf, size_t len)
{
    snprintf(buf, len, "/%s%d", g_prefix, ++g_name_counter);
}

/* Count entries of /dev/shm that start with our prefix. */
int leftover_segments(void)
{
    DIR *d = opendir("/dev/shm");
    struct dirent *e;
    int n = 0;
    if (d == NULL)
        return 0;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, g_prefix, strlen(g_prefix)) == 0) {
            fprintf(stderr, "leftover /dev/shm/%s\n", e->d_name);
            n++;
        }
    }
    closedir(d);
    return n;
}

ad_shm *join(const char *test, const char *name, int world, int rank)
{
    ad_err err = {0};
    ad_shm *h = NULL;
    ad_status st = ad_shm_attach(name, world, rank, rank == 0, 10.0, &h, &err);
    if (st != AD_OK) {
        fprintf(stderr, "  [%s rank %d] attach: %s: %s\n", test, rank,
                ad_status_name(st), err.msg);
        return NULL;
    }
    st = ad_shm_barrier(h, 10.0, &err);
    if (st == AD_OK && rank == 0)
        st = ad_shm_unlink(name, &err);
    if (st != AD_OK) {
        fprintf(stderr, "  [%s rank %d] join: %s: %s\n", test, rank,
                ad_status_name(st), err.msg);
        ad_shm_detach(h, 1);
        return NULL;
    }
    return h;
}

int run_ranks(const char *test, int world, rank_fn fn, void *arg, int reap_first,
              int killed_rank)
{
    char name[96];
    pid_t pids[MAX_RANKS];
    int r, ok = 1;

    make_name(name, sizeof name);
    fflush(stdout);
    fflush(stderr);
    for (r = 0; r < world; r++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            world = r;
            ok = 0;
            break;
        }
        if (pid == 0) {
            int rc;
            alarm(CHILD_ALARM_S);
            rc = fn(test, name, world, r, arg);
            exit(rc == 0 ? 0 : 1);
        }
        pids[r] = pid;
    }
    for (int k = -1; k < world; k++) {
        int status = 0;
        r = k < 0 ? reap_first : k;
        if (r < 0 || (k >= 0 && r == reap_first))
            continue;
        if (waitpid(pids[r], &status, 0) < 0) {
            perror("waitpid");
            ok = 0;
            continue;
        }
        if (r == killed_rank) {
            if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL) {
                fprintf(stderr, "  [%s] rank %d was meant to die of SIGKILL\n",
                        test, r);
                ok = 0;
            }
        } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            if (WIFSIGNALED(status))
                fprintf(stderr, "  [%s] rank %d killed by signal %d\n", test,
                        r, WTERMSIG(status));
            else
                fprintf(stderr, "  [%s] rank %d exited with %d\n", test, r,
                        WEXITSTATUS(status));
            ok = 0;
        }
    }
    return ok;
}

int expect(const char *what, ad_status st, const ad_err *err, ad_status want, double dt,
           double lo, double hi, const char *word1, const char *word2)
{
    if (st != want) {
        fprintf(stderr, "  %s: got %s (%s), want %s\n", what,
                ad_status_name(st), err->msg, ad_status_name(want));
        return 1;
    }
    if (dt < lo || dt > hi) {
        fprintf(stderr, "  %s: took %.3f s, want %.3f..%.3f s (%s)\n", what,
                dt, lo, hi, err->msg);
        return 1;
    }
    if ((word1 && !strstr(err->msg, word1)) ||
        (word2 && !strstr(err->msg, word2))) {
        fprintf(stderr, "  %s: message lacks \"%s\"/\"%s\": %s\n", what,
                word1 ? word1 : "", word2 ? word2 : "", err->msg);
        return 1;
    }
    return 0;
}
