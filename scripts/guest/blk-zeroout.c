// blk-zeroout DEVICE OFFSET LENGTH: zeroes a byte range of a block device
// with the BLKZEROOUT ioctl (the kernel sends WRITE_ZEROES when the device
// offers it). Busybox has no tool for this; built statically for guests.
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: blk-zeroout DEVICE OFFSET LENGTH\n");
        return 2;
    }
    char *end;
    errno = 0;
    uint64_t range[2];
    range[0] = strtoull(argv[2], &end, 0);
    if (errno || *end) {
        fprintf(stderr, "blk-zeroout: bad offset '%s'\n", argv[2]);
        return 2;
    }
    range[1] = strtoull(argv[3], &end, 0);
    if (errno || *end) {
        fprintf(stderr, "blk-zeroout: bad length '%s'\n", argv[3]);
        return 2;
    }
    int fd = open(argv[1], O_WRONLY);
    if (fd < 0) {
        fprintf(stderr, "blk-zeroout: open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    if (ioctl(fd, BLKZEROOUT, range) < 0) {
        fprintf(stderr, "blk-zeroout: BLKZEROOUT: %s\n", strerror(errno));
        return 1;
    }
    return close(fd) < 0;
}
