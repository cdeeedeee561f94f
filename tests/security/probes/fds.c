// SPDX-License-Identifier: BSD-2-Clause
// No host handle crosses exec: every fd above 2 open at start is a leak.
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

int main(void) {
    int leaked = 0;
    for (int fd = 3; fd < 4096; fd++) {
        if (fcntl(fd, F_GETFD) < 0)
            continue;
        char link[64], target[4096];
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, target, sizeof target - 1);
        target[n < 0 ? 0 : n] = 0;
        printf("fd %d open: %s\n", fd, n < 0 ? "?" : target);
        leaked = 1;
    }
    if (!leaked)
        printf("only 0-2 open\n");
    return leaked;
}
