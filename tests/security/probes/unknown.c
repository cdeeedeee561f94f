// SPDX-License-Identifier: BSD-2-Clause
// System calls the filter does not know fail with ENOSYS (libc falls back),
// known but denied ones with EPERM: cachestat (451, newer than systemd 252's
// list), a number far above every table, and quotactl (of a path that does
// not exist: ENOENT would mean it got to the kernel).
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int expect(const char *what, long rc, int want) {
    if (rc >= 0 || errno != want) {
        printf("%s: %s, wanted %s\n", what, rc >= 0 ? "succeeded" : strerror(errno), strerror(want));
        return 1;
    }
    printf("%s: %s\n", what, strerror(errno));
    return 0;
}

int main(void) {
    int bad = 0;
    bad |= expect("cachestat(451)", syscall(451, -1, NULL, NULL, 0), ENOSYS);
    bad |= expect("syscall(4000)", syscall(4000, 0, 0, 0), ENOSYS);
    bad |= expect("quotactl", syscall(SYS_quotactl, 0x800005, "/nonexistent-probe", 0, NULL), EPERM);
    return bad;
}
