/* What glibc decided at start-up, as glibc's own API reports it, and a process that keeps working
 * after a restore.
 *
 * usage: glibc_features DIR
 * Writes DIR/truth ("version V" and "active NAME..." as <sys/platform/x86.h> CPU_FEATURE_ACTIVE says,
 * for the features criu_xstate/glibc.py reads), then DIR/ready; polls for DIR/go without taking a
 * signal. Then calls functions it never called before (lazy binding through glibc's trampolines, and
 * string ifuncs), writes DIR/result ("ok N") and DIR/done, and exits. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <gnu/libc-version.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/platform/x86.h>
#include <time.h>
#include <unistd.h>

#define F(n) { #n, CPU_FEATURE_ACTIVE(n) }

static void put(const char *dir, const char *name, const char *text)
{
	char path[4096], tmp[4200];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	snprintf(tmp, sizeof tmp, "%s.tmp", path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
		_exit(2);
	close(fd);
	rename(tmp, path);
}

int main(int argc, char **argv)
{
	struct { const char *name; int on; } f[] = {
		F(SSSE3), F(FMA), F(SSE4_1), F(SSE4_2), F(MOVBE), F(POPCNT), F(AVX), F(BMI1),
		F(AVX2), F(BMI2), F(RTM), F(AVX512F), F(AVX512DQ), F(AVX512CD), F(AVX512BW), F(AVX512VL),
		F(LZCNT), F(FMA4),
	};
	char truth[2048], go[4096], result[256];
	if (argc != 2)
		return 64;
	int n = snprintf(truth, sizeof truth, "version %s\nactive", gnu_get_libc_version());
	for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
		if (f[i].on)
			n += snprintf(truth + n, sizeof truth - n, " %s", f[i].name);
	snprintf(truth + n, sizeof truth - n, "\n");
	put(argv[1], "truth", truth);
	put(argv[1], "ready", "");
	snprintf(go, sizeof go, "%s/go", argv[1]);
	struct timespec ts = {0, 20 * 1000 * 1000};
	while (access(go, F_OK) != 0)
		nanosleep(&ts, NULL);
	/* First calls after the restore: bound lazily, through the trampoline and its save area. */
	char *a = strdup("criu-xstate-1.10"), *b = strndup("criu-xstate-1.9xx", 15);
	int cmp = strverscmp(a, b);
	char buf[4096];
	memset(buf, 'x', sizeof buf - 1);
	buf[sizeof buf - 1] = 0;
	size_t len = strlen(buf) + strspn(buf, "x") + (size_t)(memrchr(buf, 'x', sizeof buf - 1) != NULL);
	snprintf(result, sizeof result, "ok %d %zu\n", cmp, len);
	free(a);
	free(b);
	put(argv[1], "result", result);
	put(argv[1], "done", "");
	return 0;
}
