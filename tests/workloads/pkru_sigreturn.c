/* What PKRU does a thread get back from rt_sigreturn when the frame's XSAVE image lacks the PKRU
 * component? Prints one line per variant: the value read with RDPKRU after sigreturn. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>
#include <cpuid.h>

static int variant;
static unsigned rdpkru(void) { unsigned a, d, c = 0; __asm__ volatile("rdpkru" : "=a"(a), "=d"(d) : "c"(c)); return a; }
static void wrpkru(unsigned v) { unsigned c = 0, d = 0; __asm__ volatile("wrpkru" : : "a"(v), "c"(c), "d"(d)); }

static void handler(int sig, siginfo_t *si, void *ctx)
{
	ucontext_t *uc = ctx;
	unsigned char *fp = (unsigned char *)uc->uc_mcontext.fpregs;
	uint64_t *xstate_bv = (uint64_t *)(fp + 512);
	uint64_t *sw_xfeatures = (uint64_t *)(fp + 464 + 8);
	(void)sig; (void)si;
	if (variant >= 1) *xstate_bv &= ~(1ull << 9);     /* PKRU component "in init state" */
	if (variant >= 2) *sw_xfeatures &= ~(1ull << 9);  /* and not part of the frame at all */
}

int main(void)
{
	unsigned a, b, c, d;
	__cpuid_count(7, 0, a, b, c, d);
	if (!(c & (1u << 4))) { printf("no-ospke\n"); return 0; }
	printf("initial 0x%08x\n", rdpkru());
	struct sigaction sa; memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = handler; sa.sa_flags = SA_SIGINFO;
	sigaction(SIGUSR1, &sa, NULL);
	for (variant = 0; variant < 3; variant++) {
		wrpkru(0x54555554);  /* not the default: key 12 differs */
		raise(SIGUSR1);
		printf("variant %d after 0x%08x\n", variant, rdpkru());
	}
	return 0;
}
