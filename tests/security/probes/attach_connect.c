/* SPDX-License-Identifier: BSD-2-Clause */
/* Attacker: take a detached container's console from machinepy's attach sockets.
 * Each argument is a socket path or @NAME (abstract).  Escaped when a server
 * hands us an fd or any byte at all. */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

static int try_one(const char *addr) {
    struct sockaddr_un sa;
    socklen_t len;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    if (strlen(addr) >= sizeof sa.sun_path) {
        printf("cannot try %s: too long\n", addr);
        return 2;
    }
    if (addr[0] == '@') {
        memcpy(sa.sun_path + 1, addr + 1, strlen(addr + 1));
        len = offsetof(struct sockaddr_un, sun_path) + strlen(addr);
    } else {
        strcpy(sa.sun_path, addr);
        len = sizeof sa;
    }
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0) {
        printf("cannot try %s: socket: %s\n", addr, strerror(errno));
        return 2;
    }
    if (connect(s, (struct sockaddr *)&sa, len) < 0) {
        printf("blocked: connect %s: %s\n", addr, strerror(errno));
        close(s);
        return 0;
    }
    struct timeval tv = {3, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char buf[64];
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {buf, sizeof buf};
    struct msghdr m;
    memset(&m, 0, sizeof m);
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = cbuf;
    m.msg_controllen = sizeof cbuf;
    ssize_t n = recvmsg(s, &m, 0);
    struct cmsghdr *c = n >= 0 ? CMSG_FIRSTHDR(&m) : NULL;
    close(s);
    if (c != NULL && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        printf("ESCAPED: %s handed us an fd (the console)\n", addr);
        return 1;
    }
    if (n > 0) {
        printf("ESCAPED: %s sent us %zd bytes\n", addr, n);
        return 1;
    }
    printf("blocked: %s connected, then %s, no byte, no fd\n", addr,
           n == 0 ? "hung up" : strerror(errno));
    return 0;
}

int main(int argc, char **argv) {
    int worst = 0;
    if (argc < 2) {
        printf("usage: attach_connect ADDR...\n");
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        int r = try_one(argv[i]);
        if (r == 1 || (r == 2 && worst == 0))
            worst = r;
    }
    return worst;
}
