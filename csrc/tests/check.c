/*
 * check.c -- counted checks and results for the C test programs (check.h).
 */
#define _POSIX_C_SOURCE 200809L

#include "check.h"

#include <stdio.h>
#include <time.h>

int check_passed, check_failed;

int check_that(int ok, const char *file, int line, const char *expr, const char *detail)
{
    if (ok) {
        check_passed++;
    } else {
        check_failed++;
        fprintf(stderr, "%s:%d: check failed: %s%s%s\n", file, line, expr,
                detail != NULL ? " -- " : "", detail != NULL ? detail : "");
    }
    return ok;
}

void check_report(const char *name, int ok, const char *detail)
{
    if (ok)
        check_passed++;
    else
        check_failed++;
    printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name, detail != NULL ? ": " : "",
           detail != NULL ? detail : "");
    fflush(stdout);
}

void check_reset(void)
{
    check_passed = 0;
    check_failed = 0;
}

int check_summary(void)
{
    printf("%d passed, %d failed\n", check_passed, check_failed);
    fflush(stdout);
    return check_failed == 0 ? 0 : 1;
}

double check_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
