/* The floor's /init: power the VM off at once. What kvmpod adds on top of this is its cost. */
#include <sys/reboot.h>
#include <unistd.h>

int main(void)
{
	sync();
	reboot(RB_POWER_OFF);
	reboot(RB_AUTOBOOT); /* QEMU runs with -no-reboot: a reset ends it as well */
	return 0;
}
