/*
 * latereply: a reply that is already in the socket when the round trip's
 * deadline has passed (the host was stopped or descheduled past it) is
 * read, not dropped as a timeout: the agent signed and journaled it.
 * Built with the module's agent.c included, to call its read_frame.
 */
#include "../csrc/agent.c"

int main(void)
{
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) {
		perror("socketpair");
		return 2;
	}
	const uint8_t frame[] = {0, 0, 0, 4, 'a', 'b', 'c', 'd'};
	if (write(sv[1], frame, sizeof frame) != (ssize_t)sizeof frame) {
		perror("write");
		return 2;
	}
	uint8_t buf[64], *body = NULL;
	uint32_t n = 0;
	int rc = read_frame(sv[0], now_ns() - 1, buf, sizeof buf, &body, &n);
	printf("read_frame past its deadline: rc %d, %u bytes\n", rc, (unsigned)n);
	return rc == 0 && n == 4 && memcmp(body, "abcd", 4) == 0 ? 0 : 1;
}
