// SPDX-License-Identifier: BSD-2-Clause
// socket(AF_NETLINK, SOCK_RAW, NETLINK_AUDIT): audit is not namespaced.  Must
// fail with EAFNOSUPPORT (what audit userspace reads as "no audit"), while
// other netlink sockets still open.
#include <errno.h>
#include <linux/netlink.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void) {
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_AUDIT);
    if (fd >= 0) { printf("NETLINK_AUDIT socket: opened\n"); return 1; }
    printf("NETLINK_AUDIT socket: %s\n", strerror(errno));
    if (errno != EAFNOSUPPORT) return 1;
    fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0) { perror("NETLINK_ROUTE socket"); return 2; }
    return 0;
}
