/*
 * check.h -- the little every C test program in csrc/tests shares: counted
 * checks that print where they failed, named test results, the closing
 * "N passed, M failed" line the pytest wrappers read, and a clock.
 */
#ifndef ASYNCDIFF_TESTS_CHECK_H
#define ASYNCDIFF_TESTS_CHECK_H

/* Counted so far in this process (a forked child starts from its parent's
 * counts: call check_reset first thing). */
extern int check_passed, check_failed;

/* Count one check; on failure print file:line, the expression and the
 * detail (may be NULL) on stderr.  Returns ok. */
int check_that(int ok, const char *file, int line, const char *expr, const char *detail);

#define CHECK(cond) check_that((cond) != 0, __FILE__, __LINE__, #cond, NULL)
#define CHECK_MSG(cond, detail) check_that((cond) != 0, __FILE__, __LINE__, #cond, (detail))

/* Count one named test and print "PASS name" or "FAIL name" (with the
 * detail, which may be NULL) on stdout. */
void check_report(const char *name, int ok, const char *detail);

void check_reset(void);

/* Print "N passed, M failed"; the program's exit status (0 when none
 * failed). */
int check_summary(void);

/* Seconds on the monotonic clock. */
double check_now(void);

#endif /* ASYNCDIFF_TESTS_CHECK_H */
