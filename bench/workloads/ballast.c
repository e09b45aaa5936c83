/* ballast DIR MIB: touch MIB MiB of anonymous memory (every page written, so CRIU dumps it), then
 * enter a SIGUSR1 handler and stay there: a process with a live signal frame and a large pagemap,
 * for `python -m bench` to dump with real CRIU. DIR/ready appears once it is parked. */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

static const char *dir;

static void handler(int sig, siginfo_t *si, void *uc)
{
	char path[4096];
	(void)sig; (void)si; (void)uc;
	snprintf(path, sizeof(path), "%s/ready", dir);
	close(open(path, O_CREAT | O_WRONLY, 0644));
	for (;;)
		pause();
}

int main(int argc, char **argv)
{
	struct sigaction sa = { 0 };
	size_t len, i;
	unsigned char *p;

	if (argc != 3) {
		fprintf(stderr, "usage: %s DIR MIB\n", argv[0]);
		return 2;
	}
	dir = argv[1];
	len = strtoull(argv[2], NULL, 0) << 20;
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return 1;
	for (i = 0; i < len; i += 4096)
		p[i] = (unsigned char)((i >> 12) | 1);
	sa.sa_sigaction = handler;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	raise(SIGUSR1);
	return 0;
}
