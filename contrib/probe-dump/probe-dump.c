/*
 * probe-dump: print this machine's raw XSAVE facts for `criu-xstate probe --from-dump FILE`, so a host
 * (or a QEMU guest) with no Python can be described. No dependencies; build static:
 *     gcc -static -O2 -o probe-dump probe-dump.c
 * Output format (one fact per line): see criu_xstate/x86/cpuid.py parse_dump().
 */
#include <cpuid.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

static void leaf(unsigned l, unsigned s)
{
	unsigned a, b, c, d;
	__cpuid_count(l, s, a, b, c, d);
	printf("cpuid 0x%x 0x%x 0x%x 0x%x 0x%x 0x%x\n", l, s, a, b, c, d);
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
	if (c & (1u << 27)) { /* OSXSAVE */
		uint32_t lo, hi;
		__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
		printf("xcr0 0x%llx\n", ((unsigned long long)hi << 32) | lo);
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
	return 0;
}
