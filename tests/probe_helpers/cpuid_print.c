/* Independent reading of the facts `criu-xstate probe` reports, for tests/test_hosts.py:
 * XCR0 (xgetbv), CPUID 0xD sub-leaves, FXSAVE's MXCSR_MASK and AT_MINSIGSTKSZ from the aux vector. */
#include <cpuid.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/auxv.h>

int main(void)
{
	unsigned a, b, c, d;
	uint32_t lo, hi;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	printf("xcr0 0x%llx\n", ((unsigned long long)hi << 32) | lo);
	__cpuid_count(0xd, 0, a, b, c, d);
	printf("xsave_size %u\n", b);
	for (unsigned i = 2; i < 20; i++) {
		__cpuid_count(0xd, i, a, b, c, d);
		if (a)
			printf("component %u %u %u\n", i, b, a);
	}
	static uint8_t fx[512] __attribute__((aligned(64)));
	__asm__ volatile("fxsave %0" : "=m"(fx));
	uint32_t mask;
	memcpy(&mask, fx + 28, 4);
	printf("mxcsr_mask 0x%x\n", mask ? mask : 0xffbf);
	printf("minsigstksz %lu\n", getauxval(51));
	return 0;
}
