// SPDX-License-Identifier: BSD-2-Clause
// swapoff(2) of a scratch file (argv[1]), not a swap area: EINVAL would mean
// the call reached the kernel's swap code, which may as well be the host's swap.
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/swap.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: swapoff SCRATCH\n"); return 2; }
    int fd = open(argv[1], O_WRONLY | O_CREAT, 0600);
    if (fd < 0) { perror(argv[1]); return 2; }
    close(fd);
    if (swapoff(argv[1]) == 0) { printf("swapoff: succeeded\n"); return 1; }
    printf("swapoff: %s\n", strerror(errno));
    return errno == EPERM || errno == ENOSYS ? 0 : 1;
}
