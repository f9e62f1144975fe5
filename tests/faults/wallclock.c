/* A wall-clock step for the processes it is preloaded into (the clock_step fault).
 *
 * LD_PRELOAD=wallclock.so TKM_CLOCK_OFFSET_FILE=/path/offset: every reading of the
 * wall clock (clock_gettime on CLOCK_REALTIME and its variants, gettimeofday, time)
 * is shifted by the number of seconds in that file ("3600", "-90.5"; absent or
 * empty: 0), re-read at most every 20 ms, so a test steps the clock of running
 * processes by rewriting the file. The monotonic and boot-time clocks are left
 * alone, as an NTP step leaves them. (libfaketime 0.9.10 does this too, but with
 * FAKETIME_DONT_FAKE_MONOTONIC every Python time.sleep fails with EINVAL.)
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static clock_gettime_fn real_clock_gettime;
static volatile long long offset_ns;
static volatile long long next_read_ns;

static long long monotonic_ns(void) {
    struct timespec ts;
    real_clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long current_offset(void) {
    if (!real_clock_gettime)
        real_clock_gettime = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    long long now = monotonic_ns();
    if (now >= next_read_ns) {
        const char *path = getenv("TKM_CLOCK_OFFSET_FILE");
        double seconds = 0.0;
        FILE *f = path ? fopen(path, "r") : NULL;
        if (f) {
            if (fscanf(f, "%lf", &seconds) != 1)
                seconds = 0.0;
            fclose(f);
        }
        offset_ns = (long long)(seconds * 1e9);
        next_read_ns = now + 20000000LL;
    }
    return offset_ns;
}

static void shift(struct timespec *ts, long long ns) {
    long long total = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + ns;
    ts->tv_sec = (time_t)(total / 1000000000LL);
    ts->tv_nsec = (long)(total % 1000000000LL);
    if (ts->tv_nsec < 0) {
        ts->tv_nsec += 1000000000L;
        ts->tv_sec -= 1;
    }
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    long long ns = current_offset();
    int rc = real_clock_gettime(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE || id == CLOCK_TAI))
        shift(ts, ns);
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return -1;
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out)
        *out = ts.tv_sec;
    return ts.tv_sec;
}
