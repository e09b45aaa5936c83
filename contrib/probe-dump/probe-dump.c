/*
 * probe-dump: print this machine's raw XSAVE facts for `criu-xstate probe --from-dump FILE`, so a host
 * (or a QEMU guest) with no Python can be described. No dependencies; build static:
 *     gcc -static -O2 -o probe-dump probe-dump.c
 * Output format (one fact per line): see criu_xstate/x86/cpuid.py parse_dump().
 */
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

static void leaf(unsigned l, unsigned s)
{
	unsigned a, b, c, d;
	__cpuid_count(l, s, a, b, c, d);
	printf("cpuid 0x%x 0x%x 0x%x 0x%x 0x%x 0x%x\n", l, s, a, b, c, d);
}

/*
 * The kernel's sigreturn rule, measured (docs/sigreturn-probe.md; the same test as
 * criu_xstate/x86/sigreturn_probe.py). In a child: YMM15 holds a known pattern, SIGUSR1 is raised,
 * the handler clears magic2 at the frame's end, sets xstate_size to `st_size` (extended_size + 4)
 * with magic2 at fpstate + st_size and masks sw.xfeatures / XSTATE_BV to x87|SSE|AVX. After
 * sigreturn: YMM15's upper half kept = frame-size rule, zeroed (x87/SSE-only restore) = user-size.
 * st_size 0 is the control: same rewrite at the frame's own size, YMM15 must survive.
 */
#define MAGIC2 0x46505845u
static volatile uint32_t st_size, st_frame;
static uint8_t st_in[32] __attribute__((aligned(32))), st_out[32] __attribute__((aligned(32)));

static void st_handler(int sig, siginfo_t *si, void *ucv)
{
	(void)sig;
	(void)si;
	uint8_t *fp = *(uint8_t **)((uint8_t *)ucv + 224); /* uc_mcontext.fpstate */
	if (!fp)
		return;
	uint32_t old, size, ext;
	uint64_t xf, bv;
	memcpy(&old, fp + 480, 4);
	st_frame = old;
	size = st_size ? st_size : old;
	ext = size + 4;
	memset(fp + old, 0, 4);
	memcpy(fp + 480, &size, 4);
	memcpy(fp + 468, &ext, 4);
	uint32_t m2 = MAGIC2;
	memcpy(fp + size, &m2, 4);
	memcpy(&xf, fp + 472, 8);
	memcpy(&bv, fp + 512, 8);
	xf &= 0x7;
	bv &= 0x7;
	memcpy(fp + 472, &xf, 8);
	memcpy(fp + 512, &bv, 8);
}

/* 0 upper kept, 1 upper zeroed, 2 other, 3 xmm lost */
static int st_round_trip(uint32_t size)
{
	st_size = size;
	memset(st_out, 0xee, 32);
	long pid = getpid();
	__asm__ volatile("vmovdqu %[in], %%ymm15\n\t"
			 "mov $62, %%eax\n\t"
			 "mov %[pid], %%rdi\n\t"
			 "mov $10, %%esi\n\t"
			 "syscall\n\t"
			 "vmovdqu %%ymm15, %[out]\n\t"
			 "vzeroupper\n\t"
			 : [out] "=m"(st_out)
			 : [in] "m"(st_in), [pid] "r"(pid)
			 : "rax", "rdi", "rsi", "rcx", "r11", "memory", "xmm15");
	if (memcmp(st_out, st_in, 16))
		return 3;
	if (!memcmp(st_out + 16, st_in + 16, 16))
		return 0;
	for (int i = 16; i < 32; i++)
		if (st_out[i])
			return 2;
	return 1;
}

static void st_child(int fd, uint32_t avx_end)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = st_handler;
	sa.sa_flags = SA_SIGINFO;
	sigaction(SIGUSR1, &sa, 0);
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_UNBLOCK, &set, 0);
	for (int i = 0; i < 32; i++)
		st_in[i] = 0x11 + i;
	int control = st_round_trip(0);
	uint32_t frame = st_frame, size = avx_end < frame ? avx_end : (frame > 576 ? 576 : 0);
	int probe = size ? st_round_trip(size) : 0;
	char buf[200];
	static const char *const what[] = {"kept", "zeroed", "other", "lost"};
	if (!frame)
		snprintf(buf, sizeof buf, "unknown the signal handler did not run\n");
	else if (control != 0)
		snprintf(buf, sizeof buf, "unknown control frame (%u bytes) lost YMM15 (%s)\n", frame, what[control]);
	else if (!size)
		snprintf(buf, sizeof buf, "cannot-matter kernel frame is %u bytes: no smaller frame is valid\n", frame);
	else
		snprintf(buf, sizeof buf, "%s kernel frame of %u bytes rewritten to xstate_size %u with magic2 at %u: YMM15 upper half %s\n",
			 probe == 0 ? "frame-size" : probe == 1 ? "user-size" : "unknown", frame, size, size, what[probe]);
	if (write(fd, buf, strlen(buf)) < 0)
		_exit(2);
	_exit(0);
}

static void sigreturn_selftest(int xsave, uint64_t xcr0, uint32_t avx_end, uint32_t user_size)
{
	if (!xsave) {
		printf("sigreturn cannot-matter no XSAVE: signal frames carry no XSAVE image and no magic2\n");
		return;
	}
	if (user_size <= 576) {
		printf("sigreturn cannot-matter user xstate size is the minimum 576: both rules look at the same place\n");
		return;
	}
	if (!(xcr0 & 4)) {
		printf("sigreturn unknown AVX not enabled in XCR0: no YMM register to observe the restore with\n");
		return;
	}
	int p[2];
	if (pipe(p))
		return;
	fflush(stdout);
	pid_t pid = fork();
	if (pid == 0) {
		close(p[0]);
		st_child(p[1], avx_end);
	}
	close(p[1]);
	char buf[200] = "";
	ssize_t n = pid > 0 ? read(p[0], buf, sizeof buf - 1) : -1;
	close(p[0]);
	int st = 0;
	if (pid > 0)
		waitpid(pid, &st, 0);
	if (n > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0) {
		buf[n] = 0;
		printf("sigreturn %s", buf);
	} else if (pid > 0 && WIFSIGNALED(st)) {
		printf("sigreturn unknown self-test child killed by signal %d\n", WTERMSIG(st));
	} else {
		printf("sigreturn unknown self-test child gave no result\n");
	}
}

int main(void)
{
	unsigned a, b, c, d, maxl, maxe;
	__cpuid(0, maxl, b, c, d);
	__cpuid(0x80000000, maxe, b, c, d);
	printf("# criu-xstate probe-dump v1\n");
	leaf(0, 0);
	leaf(1, 0);
	if (maxl >= 7)
		leaf(7, 0);
	if (maxl >= 0xd)
		for (unsigned i = 0; i < 20; i++)
			leaf(0xd, i);
	if (maxe >= 0x80000001)
		leaf(0x80000001, 0);
	__cpuid(1, a, b, c, d);
	int osxsave = !!(c & (1u << 27));
	uint64_t xcr0 = 0;
	if (osxsave) {
		uint32_t lo, hi;
		__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
		xcr0 = ((uint64_t)hi << 32) | lo;
		printf("xcr0 0x%llx\n", (unsigned long long)xcr0);
	}
	uint64_t supp = 0;
	if (syscall(SYS_arch_prctl, 0x1021, &supp) == 0)
		printf("xcomp_supp 0x%llx\n", (unsigned long long)supp);
	else
		printf("xcomp_supp -\n");
	static uint8_t fx[512] __attribute__((aligned(64)));
	__asm__ volatile("fxsave %0" : "=m"(fx));
	uint32_t mask;
	memcpy(&mask, fx + 28, 4);
	printf("mxcsr_mask 0x%x\n", mask ? mask : 0xffbf);
	printf("minsigstksz %lu\n", getauxval(51));
	struct utsname u;
	if (uname(&u) == 0)
		printf("release %s\n", u.release);
	FILE *f = fopen("/proc/cpuinfo", "r");
	char line[8192];
	int got_flags = 0, got_name = 0;
	while (f && fgets(line, sizeof line, f)) {
		line[strcspn(line, "\n")] = 0;
		char *v = strchr(line, ':');
		if (!v)
			continue;
		v += 2;
		if (!got_flags && !strncmp(line, "flags", 5)) {
			printf("flags %s\n", v);
			got_flags = 1;
		} else if (!got_name && !strncmp(line, "model name", 10)) {
			printf("model_name %s\n", v);
			got_name = 1;
		}
	}
	if (f)
		fclose(f);
	uint32_t avx_end = 0, user_size = 0;
	if (osxsave && maxl >= 0xd) {
		__cpuid_count(0xd, 2, a, b, c, d);
		avx_end = a + b;
		__cpuid_count(0xd, 0, a, b, c, d);
		user_size = b; /* XCR0's size; the self-test uses the frame's own size */
	}
	fflush(stdout);
	sigreturn_selftest(osxsave, xcr0, avx_end, user_size);
	return 0;
}
