/*
 * A request/response and dispatch benchmark of coroipc's C ABI, written
 * against the coroipc headers only (include/corosync/coroipcc.h), so the
 * same binary runs linked to coroipc-rs's libcoroipcc.so.4 or to the
 * original (LD_LIBRARY_PATH decides). The server is
 * capi/tests/c/test_server.c (a miniature executive over libcoroipcs.so.4),
 * with the library of the same side.
 *
 *   bench_client SOCKET TRANSPORT [ROUND_TRIPS [MESSAGES]]
 *
 * Prints coroipc-bench's line format:
 *   workload=rr64 transport=T median_ns=N p99_ns=N ops_per_s=N gbps=N
 *       request 64 B, response 64 B (coroipc headers included), one in flight
 *   workload=ev64 transport=T median_ns=0 p99_ns=0 ops_per_s=N gbps=N
 *       MESSAGES dispatch messages of 64 B, server -> client, each
 *       sequence-checked, received by a thread blocked in dispatch_get
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <corosync/coroipcc.h>

#include "../tests/c/test_proto.h"

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + t.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

struct recv_state {
	hdb_handle_t h;
	int count;
	int got;
	int bad;
	uint64_t end_ns;
};

static void *receiver(void *arg)
{
	struct recv_state *r = arg;
	void *buf;
	while (r->got < r->count) {
		cs_error_t e = coroipcc_dispatch_get(r->h, &buf, 5000);
		if (e != CS_OK) {
			fprintf(stderr, "dispatch_get: %d after %d\n", e, r->got);
			r->bad++;
			break;
		}
		const struct disp_msg *m = buf;
		if (m->seq != r->got || m->header.size != 64)
			r->bad++;
		r->got++;
		coroipcc_dispatch_put(r->h);
	}
	r->end_ns = now_ns();
	return NULL;
}

int main(int argc, char **argv)
{
	hdb_handle_t h;
	cs_error_t e;
	int n, events;
	const char *transport;
	if (argc < 3) {
		fprintf(stderr, "usage: bench_client SOCKET TRANSPORT [ROUND_TRIPS [MESSAGES]]\n");
		return 2;
	}
	transport = argv[2];
	n = argc > 3 ? atoi(argv[3]) : 200000;
	events = argc > 4 ? atoi(argv[4]) : 500000;
	for (int i = 0; i < 200; i++) {
		e = coroipcc_service_connect(argv[1], TEST_SERVICE, 1 << 20, 1 << 20, 1 << 20, &h);
		if (e != CS_ERR_TRY_AGAIN)
			break;
		usleep(10000);
	}
	if (e != CS_OK) {
		fprintf(stderr, "connect: %d\n", e);
		return 1;
	}

	/* rr64 */
	{
		char req[64], res[64];
		coroipc_request_header_t *rh = (void *)req;
		struct iovec iov = { req, sizeof(req) };
		uint64_t *lat = malloc(sizeof(uint64_t) * n), t0, t1;
		memset(req, 0, sizeof(req));
		rh->size = sizeof(req);
		rh->id = 9;
		for (int i = 0; i < n / 10 + 1; i++)	/* warm-up */
			coroipcc_msg_send_reply_receive(h, &iov, 1, res, sizeof(res));
		t0 = now_ns();
		for (int i = 0; i < n; i++) {
			uint64_t s = now_ns();
			memcpy(req + 16, &i, sizeof(i));
			e = coroipcc_msg_send_reply_receive(h, &iov, 1, res, sizeof(res));
			if (e != CS_OK || memcmp(res + 24, &i, sizeof(i)) != 0) {
				fprintf(stderr, "rr64: call %d: %d\n", i, e);
				return 1;
			}
			lat[i] = now_ns() - s;
		}
		t1 = now_ns();
		qsort(lat, n, sizeof(lat[0]), cmp_u64);
		printf("workload=rr64 transport=%s median_ns=%llu p99_ns=%llu ops_per_s=%.0f gbps=0.000\n",
		       transport, (unsigned long long)lat[n / 2], (unsigned long long)lat[(size_t)n * 99 / 100],
		       n / ((t1 - t0) / 1e9));
		free(lat);
	}

	/* ev64 */
	{
		struct recv_state r = { .h = h, .count = events };
		struct req_dispatch req = { .header = { .size = sizeof(req), .id = 2 }, .count = events, .size = 64 };
		struct iovec iov = { &req, sizeof(req) };
		coroipc_response_header_t res;
		pthread_t t;
		uint64_t t0 = now_ns();
		pthread_create(&t, NULL, receiver, &r);
		e = coroipcc_msg_send_reply_receive(h, &iov, 1, &res, sizeof(res));
		pthread_join(t, NULL);
		if (e != CS_OK || r.bad || r.got != events) {
			fprintf(stderr, "ev64: call %d, %d of %d received, %d bad\n", e, r.got, events, r.bad);
			return 1;
		}
		double secs = (r.end_ns - t0) / 1e9;
		printf("workload=ev64 transport=%s median_ns=0 p99_ns=0 ops_per_s=%.0f gbps=%.3f\n", transport,
		       events / secs, events * 64.0 / secs / 1e9);
	}
	coroipcc_service_disconnect(h);
	return 0;
}
