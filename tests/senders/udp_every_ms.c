/* A container's own first instruction in the fail-closed tests: from its first
 * instant, one UDP datagram every INTERVAL_US to each ADDR:PORT given, for at most
 * SECONDS (bounded: never a flood, never forever). Static, so it runs in any image.
 * usage: udp_every_ms SECONDS INTERVAL_US ADDR:PORT... (IPv4 test addresses only) */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc < 4)
		return 2;
	double seconds = atof(argv[1]);
	long interval_us = atol(argv[2]);
	int count = argc - 3;
	struct sockaddr_in dst[16];
	if (count > 16)
		return 2;
	for (int i = 0; i < count; i++) {
		char *colon = strchr(argv[3 + i], ':');
		if (!colon)
			return 2;
		*colon = 0;
		memset(&dst[i], 0, sizeof dst[i]);
		dst[i].sin_family = AF_INET;
		dst[i].sin_port = htons(atoi(colon + 1));
		if (inet_pton(AF_INET, argv[3 + i], &dst[i].sin_addr) != 1)
			return 2;
	}
	int s = socket(AF_INET, SOCK_DGRAM, 0);
	if (s < 0)
		return 1;
	struct timespec start, now, pause = {0, interval_us * 1000};
	clock_gettime(CLOCK_MONOTONIC, &start);
	for (unsigned long seq = 0;; seq++) {
		char payload[32];
		int len = snprintf(payload, sizeof payload, "%lu", seq);
		for (int i = 0; i < count; i++)
			sendto(s, payload, len, 0, (struct sockaddr *)&dst[i], sizeof dst[i]);
		nanosleep(&pause, NULL);
		clock_gettime(CLOCK_MONOTONIC, &now);
		if (now.tv_sec - start.tv_sec + (now.tv_nsec - start.tv_nsec) / 1e9 > seconds)
			return 0;
	}
}
