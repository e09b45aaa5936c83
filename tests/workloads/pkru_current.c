/* The current PKRU of a thread that is in no signal handler, as CRIU restores it.
 *
 * usage: pkru_current DIR
 * Writes DIR/ready ("pkru 0x........" or "no-ospke"), then polls for DIR/go without ever taking a
 * signal (so no frame of its own is on the stack when it is dumped). When DIR/go appears, writes
 * DIR/result with the same line read again with RDPKRU, then DIR/done, and exits. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int has_ospke(void)
{
	unsigned a, b, c, d;
	if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
		return 0;
	return (c >> 4) & 1;
}

static unsigned rdpkru(void)
{
	unsigned a, d, c = 0;
	__asm__ volatile("rdpkru" : "=a"(a), "=d"(d) : "c"(c));
	return a;
}

static void put(const char *dir, const char *name, const char *text)
{
	char path[4096], tmp[4200];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	snprintf(tmp, sizeof tmp, "%s.tmp", path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		_exit(2);
	if (write(fd, text, strlen(text)) != (ssize_t)strlen(text))
		_exit(2);
	close(fd);
	rename(tmp, path);
}

static void line(char *buf, size_t n)
{
	/* CPUID is read again each time: after a restore the CPU may be another one. */
	if (has_ospke())
		snprintf(buf, n, "pkru 0x%08x\n", rdpkru());
	else
		snprintf(buf, n, "no-ospke\n");
}

int main(int argc, char **argv)
{
	char buf[64], go[4096];
	if (argc != 2)
		return 64;
	line(buf, sizeof buf);
	put(argv[1], "ready", buf);
	snprintf(go, sizeof go, "%s/go", argv[1]);
	struct timespec ts = {0, 20 * 1000 * 1000};
	while (access(go, F_OK) != 0)
		nanosleep(&ts, NULL);
	line(buf, sizeof buf);
	put(argv[1], "result", buf);
	put(argv[1], "done", "");
	return 0;
}
