/*
 * Exercises every function of libcoroipcc.so.4 against test_server.c,
 * written against include/corosync/coroipcc.h only.
 *
 *   test_client all SOCKET      every check; prints PASS/FAIL lines, exit 0 iff all pass
 *   test_client hold SOCKET     connects, prints CONNECTED, blocks in dispatch_get(-1);
 *                               prints "GONE dispatch=N call=N revents=N" when the server goes
 *   test_client victim SOCKET   connects, makes a call, prints READY, sleeps (to be SIGKILLed)
 *   test_client holdref SOCKET  connects, has the server take a reference (handler 11), disconnects
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <corosync/coroipcc.h>

#include "test_proto.h"

#define REQ_SIZE (64 * 1024)
#define RES_SIZE (64 * 1024)
#define DISP_SIZE (256 * 1024)

static int failures;
static const char *sock;

#define CHECK(name, cond, ...) do { \
	if (cond) { printf("PASS %s\n", name); } \
	else { failures++; printf("FAIL %s: ", name); printf(__VA_ARGS__); printf("\n"); } \
	fflush(stdout); } while (0)

static hdb_handle_t connect_ok(void)
{
	hdb_handle_t h = 0;
	cs_error_t e;
	for (int i = 0; i < 100; i++) {
		e = coroipcc_service_connect(sock, TEST_SERVICE, REQ_SIZE, RES_SIZE, DISP_SIZE, &h);
		if (e != CS_ERR_TRY_AGAIN)
			break;
		usleep(10000);
	}
	if (e != CS_OK) {
		printf("FAIL connect: %d\n", e);
		exit(1);
	}
	return h;
}

static int readable(int fd, int ms)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };
	return poll(&p, 1, ms) > 0 ? p.revents : 0;
}

static cs_error_t call_header(hdb_handle_t h, int id, void *extra, size_t extra_len,
			      coroipc_response_header_t *res, size_t res_len)
{
	coroipc_request_header_t req = { .size = sizeof(req) + extra_len, .id = id };
	struct iovec iov[2] = { { &req, sizeof(req) }, { extra, extra_len } };
	return coroipcc_msg_send_reply_receive(h, iov, extra_len ? 2 : 1, res, res_len);
}

static cs_error_t request_dispatch(hdb_handle_t h, int id, int count, int size)
{
	struct req_dispatch req = { .header = { .size = sizeof(req), .id = id }, .count = count, .size = size };
	struct iovec iov = { &req, sizeof(req) };
	coroipc_response_header_t res;
	cs_error_t e = coroipcc_msg_send_reply_receive(h, &iov, 1, &res, sizeof(res));
	return e == CS_OK ? res.error : e;
}

static int check_disp(const void *buf, int seq, int size)
{
	const struct disp_msg *m = buf;
	const unsigned char *b = buf;
	if ((uintptr_t)buf % 8 != 0 || m->header.id != 200 || m->header.size != size || m->seq != seq ||
	    m->size != size)
		return 0;
	for (int j = sizeof(*m); j < size; j++)
		if (b[j] != (unsigned char)(seq + j))
			return 0;
	return 1;
}

static struct counters get_counters(hdb_handle_t h)
{
	struct res_counters res;
	memset(&res, 0, sizeof(res));
	call_header(h, 5, NULL, 0, &res.header, sizeof(res));
	return res.counters;
}

struct blocked { hdb_handle_t h; cs_error_t e; int ok; };

static void *blocked_dispatch(void *arg)
{
	struct blocked *b = arg;
	void *buf;
	b->e = coroipcc_dispatch_get(b->h, &buf, -1);
	if (b->e == CS_OK) {
		b->ok = check_disp(buf, 0, 64);
		coroipcc_dispatch_put(b->h);
	}
	return NULL;
}

static double now_s(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static int run_all(void)
{
	hdb_handle_t h, h2, bad = 0xdeadbeefULL;
	cs_error_t e;
	int fd, fd2;
	unsigned int fc;
	void *buf;
	char big[REQ_SIZE + 64];
	coroipc_response_header_t res;
	struct iovec iov[2];

	/* Connect errors. */
	e = coroipcc_service_connect("capi-test-nobody-listens", TEST_SERVICE, REQ_SIZE, RES_SIZE, DISP_SIZE, &h);
	CHECK("connect_unreachable_is_try_again", e == CS_ERR_TRY_AGAIN, "got %d", e);
	h = connect_ok();
	e = coroipcc_service_connect(sock, MISSING_SERVICE, REQ_SIZE, RES_SIZE, DISP_SIZE, &h2);
	CHECK("connect_missing_service_is_not_exist", e == CS_ERR_NOT_EXIST, "got %d", e);
	e = coroipcc_service_connect(sock, NO_INIT_SERVICE, REQ_SIZE, RES_SIZE, DISP_SIZE, &h2);
	CHECK("connect_service_without_init_is_not_exist", e == CS_ERR_NOT_EXIST, "got %d", e);

	/* Every function refuses an unknown handle. */
	{
		int n = 0;
		n += coroipcc_service_disconnect(bad) == CS_ERR_BAD_HANDLE;
		n += coroipcc_fd_get(bad, &fd) == CS_ERR_BAD_HANDLE;
		n += coroipcc_dispatch_get(bad, &buf, 0) == CS_ERR_BAD_HANDLE;
		n += coroipcc_dispatch_put(bad) == CS_ERR_BAD_HANDLE;
		n += coroipcc_dispatch_flow_control_get(bad, &fc) == CS_ERR_BAD_HANDLE;
		n += call_header(bad, 0, NULL, 0, &res, sizeof(res)) == CS_ERR_BAD_HANDLE;
		iov[0].iov_base = big; iov[0].iov_len = 16;
		n += coroipcc_msg_send_reply_receive_in_buf_get(bad, iov, 1, &buf) == CS_ERR_BAD_HANDLE;
		n += coroipcc_msg_send_reply_receive_in_buf_put(bad) == CS_ERR_BAD_HANDLE;
		n += coroipcc_zcb_alloc(bad, &buf, 10, 16) == CS_ERR_BAD_HANDLE;
		n += coroipcc_zcb_free(bad, big) == CS_ERR_BAD_HANDLE;
		n += coroipcc_zcb_msg_send_reply_receive(bad, big, &res, sizeof(res)) == CS_ERR_BAD_HANDLE;
		CHECK("unknown_handle_is_bad_handle_everywhere", n == 11, "%d of 11", n);
	}

	/* The dispatch fd: one per handle, stable, low, quiet while nothing is pending. */
	coroipcc_fd_get(h, &fd);
	coroipcc_fd_get(h, &fd2);
	CHECK("fd_get_is_stable_and_below_1024", fd == fd2 && fd >= 0 && fd < 1024, "%d %d", fd, fd2);
	CHECK("fd_is_quiet_without_dispatch", readable(fd, 0) == 0, "revents %d", readable(fd, 0));

	/* Echo, gathered from two iovecs; res_len larger than the response. */
	{
		struct { coroipc_request_header_t h; char p[5]; } req = { { sizeof(coroipc_request_header_t) + 5, 0 }, "hello" };
		char out[256];
		memset(out, 0x55, sizeof(out));
		iov[0].iov_base = &req; iov[0].iov_len = 10;
		iov[1].iov_base = (char *)&req + 10; iov[1].iov_len = req.h.size - 10;
		e = coroipcc_msg_send_reply_receive(h, iov, 2, out, sizeof(out));
		coroipc_response_header_t *r = (void *)out;
		int tail_zero = 1;
		for (size_t i = sizeof(*r) + 5; i < sizeof(out); i++)
			tail_zero &= out[i] == 0;
		CHECK("echo_gathers_iovecs", e == CS_OK && r->id == 100 && r->error == CS_OK &&
		      memcmp(out + sizeof(*r), "hello", 5) == 0, "e=%d id=%d", e, r->id);
		CHECK("response_shorter_than_res_len_is_zero_filled", tail_zero, "stale bytes");
	}

	/* Oversized and malformed requests. */
	memset(big, 0, sizeof(big));
	((coroipc_request_header_t *)big)->size = REQ_SIZE + 1;
	iov[0].iov_base = big; iov[0].iov_len = REQ_SIZE + 1;
	e = coroipcc_msg_send_reply_receive(h, iov, 1, &res, sizeof(res));
	CHECK("oversized_request_is_invalid_param", e == CS_ERR_INVALID_PARAM, "got %d", e);
	iov[0].iov_len = 8;
	e = coroipcc_msg_send_reply_receive(h, iov, 1, &res, sizeof(res));
	CHECK("request_shorter_than_header_is_invalid_param", e == CS_ERR_INVALID_PARAM, "got %d", e);
	{
		/* header.size larger than what was sent: the rest comes from this
		 * connection's previous request (the original's reused request
		 * area; libcpg's cpg_membership_get relies on it) ... */
		struct { coroipc_request_header_t h; char p[8]; } prev = { { sizeof(coroipc_request_header_t) + 8, 0 }, "earlier" };
		coroipc_request_header_t lie = { .size = sizeof(prev), .id = 0 };
		char out[64];
		iov[0].iov_base = &prev; iov[0].iov_len = sizeof(prev);
		coroipcc_msg_send_reply_receive(h, iov, 1, out, sizeof(out));
		iov[0].iov_base = &lie; iov[0].iov_len = sizeof(lie);
		memset(out, 0, sizeof(out));
		e = coroipcc_msg_send_reply_receive(h, iov, 1, out, sizeof(out));
		CHECK("short_request_is_completed_from_the_previous_one", e == CS_OK &&
		      strcmp(out + sizeof(coroipc_response_header_t), "earlier") == 0, "e=%d", e);
		/* ... but never beyond the connection's request area. */
		lie.size = 64 << 20;
		memset(&res, 0, sizeof(res));
		e = coroipcc_msg_send_reply_receive(h, iov, 1, &res, sizeof(res));
		CHECK("header_size_beyond_the_request_area_is_refused_by_the_server",
		      e == CS_OK && res.error == CS_ERR_INVALID_PARAM, "e=%d error=%d", e, res.error);
	}

	/* sending_allowed: 0 -> TRY_AGAIN (returned as such), -1 -> INVALID_PARAM in the header. */
	e = call_header(h, 3, NULL, 0, &res, sizeof(res));
	CHECK("sending_allowed_0_is_try_again", e == CS_ERR_TRY_AGAIN, "got %d", e);
	e = call_header(h, 4, NULL, 0, &res, sizeof(res));
	CHECK("sending_allowed_minus_1_is_invalid_param", e == CS_OK && res.error == CS_ERR_INVALID_PARAM,
	      "e=%d error=%d", e, res.error);
	e = call_header(h, 60, NULL, 0, &res, sizeof(res));
	CHECK("command_without_handler_is_invalid_param", e == CS_OK && res.error == CS_ERR_INVALID_PARAM,
	      "e=%d error=%d", e, res.error);

	/* in_buf_get/put. */
	{
		struct { coroipc_request_header_t h; char p[8]; } req = { { sizeof(coroipc_request_header_t) + 8, 0 }, "inplace" };
		iov[0].iov_base = &req; iov[0].iov_len = req.h.size;
		e = coroipcc_msg_send_reply_receive_in_buf_get(h, iov, 1, &buf);
		coroipc_response_header_t *r = buf;
		CHECK("in_buf_get_returns_the_response_in_place", e == CS_OK && (uintptr_t)buf % 8 == 0 &&
		      r->id == 100 && r->size == (int)sizeof(*r) + 8 && strcmp((char *)buf + sizeof(*r), "inplace") == 0,
		      "e=%d", e);
		e = coroipcc_msg_send_reply_receive_in_buf_put(h);
		CHECK("in_buf_put", e == CS_OK, "got %d", e);
		iov[0].iov_base = big; iov[0].iov_len = REQ_SIZE + 1;
		e = coroipcc_msg_send_reply_receive_in_buf_get(h, iov, 1, &buf);
		cs_error_t e2 = coroipcc_msg_send_reply_receive_in_buf_put(h);
		CHECK("in_buf_put_after_failed_get_is_harmless", e == CS_ERR_INVALID_PARAM && e2 == CS_OK,
		      "get %d put %d", e, e2);
	}

	/* A response sent later from another thread. */
	e = call_header(h, 1, NULL, 0, &res, sizeof(res));
	CHECK("deferred_response_from_another_thread", e == CS_OK && res.id == 101, "e=%d id=%d", e, res.id);

	/* Dispatch: level-triggered fd, aligned messages in order. */
	e = request_dispatch(h, 2, 3, 100);
	CHECK("dispatch_request", e == CS_OK, "got %d", e);
	CHECK("fd_readable_when_dispatch_pending", readable(fd, 1000) & POLLIN, "not readable");
	{
		int ok = 1, level = 1;
		for (int i = 0; i < 3; i++) {
			e = coroipcc_dispatch_get(h, &buf, 0);
			ok &= e == CS_OK && check_disp(buf, i, 100);
			coroipcc_dispatch_put(h);
			if (i < 2)
				level &= (readable(fd, 0) & POLLIN) != 0;
		}
		CHECK("dispatch_get_aligned_in_order", ok, "bad message");
		CHECK("fd_stays_readable_while_messages_remain", level, "edge-triggered");
		CHECK("fd_quiet_once_drained", readable(fd, 0) == 0, "revents %d", readable(fd, 0));
		e = coroipcc_dispatch_get(h, &buf, 0);
		CHECK("dispatch_get_0_on_empty_is_try_again", e == CS_ERR_TRY_AGAIN, "got %d", e);
		double t0 = now_s();
		e = coroipcc_dispatch_get(h, &buf, 50);
		CHECK("dispatch_get_timeout_is_try_again", e == CS_ERR_TRY_AGAIN && now_s() - t0 >= 0.04,
		      "got %d after %.3f s", e, now_s() - t0);
	}

	/* A receiver blocked in dispatch_get(-1) while another thread calls. */
	{
		struct blocked b = { .h = h };
		pthread_t t;
		pthread_create(&t, NULL, blocked_dispatch, &b);
		usleep(20000);
		e = request_dispatch(h, 2, 1, 64);
		pthread_join(t, NULL);
		CHECK("blocked_dispatch_get_with_concurrent_call", e == CS_OK && b.e == CS_OK && b.ok,
		      "call %d dispatch %d ok %d", e, b.e, b.ok);
	}

	/* Flow control: more than the ring holds, unread -> 1; drained -> 0, nothing lost. */
	{
		int count = 400, size = 8192, ok = 1, got = 0;
		e = request_dispatch(h, 2, count, size);
		coroipcc_dispatch_flow_control_get(h, &fc);
		CHECK("flow_control_on_when_ring_full", e == CS_OK && fc == 1, "e=%d fc=%u", e, fc);
		while (got < count) {
			e = coroipcc_dispatch_get(h, &buf, 2000);
			if (e != CS_OK)
				break;
			ok &= check_disp(buf, got, size);
			got++;
			coroipcc_dispatch_put(h);
		}
		CHECK("queued_dispatch_arrives_complete_in_order", ok && got == count, "got %d ok %d", got, ok);
		double t0 = now_s();
		do {
			coroipcc_dispatch_flow_control_get(h, &fc);
		} while (fc != 0 && now_s() - t0 < 5 && usleep(1000) == 0);
		CHECK("flow_control_off_once_drained", fc == 0, "fc=%u", fc);
	}

	/* Dispatch and response from the main thread while it holds serialize_lock. */
	e = request_dispatch(h, 8, 2, 64);
	{
		int ok = e == CS_OK;
		for (int i = 0; i < 2 && ok; i++) {
			ok &= coroipcc_dispatch_get(h, &buf, 2000) == CS_OK && check_disp(buf, i, 64);
			coroipcc_dispatch_put(h);
		}
		CHECK("dispatch_and_response_under_serialize_lock", ok, "e=%d", e);
	}

	/* Zero-copy buffers. */
	{
		size_t hs = sizeof(coroipc_request_header_t), n = 1000;
		void *zb = NULL;
		char out[2048];
		e = coroipcc_zcb_alloc(h, &zb, n, hs);
		CHECK("zcb_alloc", e == CS_OK && zb && (uintptr_t)zb % 8 == 0, "e=%d", e);
		coroipc_request_header_t *zh = zb;
		zh->size = hs + n;
		zh->id = 0;
		for (size_t i = 0; i < n; i++)
			((unsigned char *)zb)[hs + i] = (unsigned char)(i * 7);
		e = coroipcc_zcb_msg_send_reply_receive(h, zb, out, sizeof(out));
		coroipc_response_header_t *r = (void *)out;
		CHECK("zcb_msg_send_reply_receive_echo", e == CS_OK && r->id == 100 &&
		      memcmp(out + sizeof(*r), (char *)zb + hs, n) == 0, "e=%d", e);
		zh->size = hs + n + 100;
		e = coroipcc_zcb_msg_send_reply_receive(h, zb, out, sizeof(out));
		CHECK("zcb_header_size_beyond_buffer_is_invalid_param", e == CS_ERR_INVALID_PARAM, "got %d", e);
		e = coroipcc_zcb_msg_send_reply_receive(h, big, out, sizeof(out));
		CHECK("zcb_send_of_foreign_buffer_is_invalid_param", e == CS_ERR_INVALID_PARAM, "got %d", e);
		e = coroipcc_zcb_free(h, zb);
		CHECK("zcb_free", e == CS_OK, "got %d", e);
		e = coroipcc_zcb_free(h, zb);
		CHECK("zcb_double_free_is_invalid_param", e == CS_ERR_INVALID_PARAM, "got %d", e);
		for (int i = 0; i < 10; i++)
			coroipcc_zcb_alloc(h, &zb, 100000, hs);	/* left allocated: freed at disconnect */
	}

	/* Security refusals, with the executive's errno. */
	{
		struct req_int deny = { .header = { .size = sizeof(deny), .id = 7 }, .value = EACCES };
		iov[0].iov_base = &deny; iov[0].iov_len = sizeof(deny);
		coroipcc_msg_send_reply_receive(h, iov, 1, &res, sizeof(res));
		e = coroipcc_service_connect(sock, TEST_SERVICE, REQ_SIZE, RES_SIZE, DISP_SIZE, &h2);
		CHECK("security_valid_refusal_is_security", e == CS_ERR_SECURITY, "got %d", e);
		deny.value = EMFILE;
		coroipcc_msg_send_reply_receive(h, iov, 1, &res, sizeof(res));
		e = coroipcc_service_connect(sock, TEST_SERVICE, REQ_SIZE, RES_SIZE, DISP_SIZE, &h2);
		CHECK("security_valid_emfile_is_no_resources", e == CS_ERR_NO_RESOURCES, "got %d", e);
	}

	/* exit_fn returning -1 is called again until it returns 0. */
	{
		struct counters before = get_counters(h), after;
		h2 = connect_ok();
		e = call_header(h2, 6, NULL, 0, &res, sizeof(res));
		coroipcc_service_disconnect(h2);
		double t0 = now_s();
		do {
			usleep(5000);
			after = get_counters(h);
		} while (after.exits < before.exits + 1 && now_s() - t0 < 5);
		CHECK("exit_fn_minus_1_is_retried", e == CS_OK && after.exits == before.exits + 1 &&
		      after.exit_retries >= before.exit_retries + 3, "exits %d->%d retries %d->%d",
		      before.exits, after.exits, before.exit_retries, after.exit_retries);
	}

	/* A disconnect from another thread ends a blocked dispatch_get. */
	{
		struct blocked b;
		pthread_t t;
		h2 = connect_ok();
		b.h = h2;
		b.e = 0;
		pthread_create(&t, NULL, blocked_dispatch, &b);
		usleep(20000);
		coroipcc_service_disconnect(h2);
		pthread_join(t, NULL);
		CHECK("disconnect_ends_a_blocked_dispatch_get", b.e == CS_ERR_BAD_HANDLE, "got %d", b.e);
	}

	/* dispatch_put after the handle was destroyed (finalize from a callback). */
	{
		h2 = connect_ok();
		e = request_dispatch(h2, 2, 1, 64);
		e = e == CS_OK ? coroipcc_dispatch_get(h2, &buf, 2000) : e;
		cs_error_t d = coroipcc_service_disconnect(h2);
		int ok = e == CS_OK && check_disp(buf, 0, 64);	/* still readable */
		cs_error_t p = coroipcc_dispatch_put(h2);
		cs_error_t g = coroipcc_dispatch_get(h2, &buf, 0);
		CHECK("dispatch_put_after_disconnect", ok && d == CS_OK && p == CS_OK && g == CS_ERR_BAD_HANDLE,
		      "get %d ok %d disconnect %d put %d get %d", e, ok, d, p, g);
	}

	/* What the executive saw. */
	{
		struct counters c = get_counters(h);
		CHECK("callbacks_ran_under_serialize_lock", c.lock_violations == 0, "%d violations", c.lock_violations);
		CHECK("handlers_saw_aligned_checked_requests", c.bad_requests == 0, "%d bad", c.bad_requests);
		CHECK("private_data_zeroed", c.dirty_private_data == 0 && c.inits >= 3, "dirty %d inits %d",
		      c.dirty_private_data, c.inits);
		CHECK("stats_callbacks_called", c.stats_created >= 3 && c.stats_destroyed >= 2 &&
		      c.stats_increments > 0, "created %d destroyed %d incr %d", c.stats_created,
		      c.stats_destroyed, c.stats_increments);
		CHECK("deferred_answer_counted", c.deferred_answers >= 1 && c.main_dispatches >= 1, "%d %d",
		      c.deferred_answers, c.main_dispatches);
	}

	e = coroipcc_service_disconnect(h);
	CHECK("disconnect", e == CS_OK, "got %d", e);
	e = coroipcc_fd_get(h, &fd);
	CHECK("destroyed_handle_is_bad_handle", e == CS_ERR_BAD_HANDLE, "got %d", e);
	e = coroipcc_service_disconnect(h);
	CHECK("second_disconnect_is_bad_handle", e == CS_ERR_BAD_HANDLE, "got %d", e);
	printf("DONE failures=%d\n", failures);
	return failures ? 1 : 0;
}

static int run_hold(void)
{
	hdb_handle_t h = connect_ok();
	void *buf;
	int fd;
	coroipc_response_header_t res;
	coroipcc_fd_get(h, &fd);
	/* A round trip first: connect returns once the server accepted, which
	 * can be before the service's init_fn ran; an answer comes after it. */
	call_header(h, 0, NULL, 0, &res, sizeof(res));
	printf("CONNECTED\n");
	fflush(stdout);
	cs_error_t d = coroipcc_dispatch_get(h, &buf, -1);
	int rev = readable(fd, 1000);
	cs_error_t c = call_header(h, 0, NULL, 0, &res, sizeof(res));
	printf("GONE dispatch=%d call=%d revents=%d\n", d, c, rev);
	fflush(stdout);
	coroipcc_service_disconnect(h);
	return 0;
}

static int run_victim(void) __attribute__((noreturn));
static int run_victim(void)
{
	hdb_handle_t h = connect_ok();
	coroipc_response_header_t res;
	void *zb;
	call_header(h, 0, NULL, 0, &res, sizeof(res));
	coroipcc_zcb_alloc(h, &zb, 1 << 20, 16);
	request_dispatch(h, 2, 300, 8192);	/* leaves the server a full ring and a queue */
	printf("READY\n");
	fflush(stdout);
	for (;;)
		pause();
}

static int run_holdref(void)
{
	hdb_handle_t h = connect_ok();
	coroipc_response_header_t res;
	cs_error_t e = call_header(h, 11, NULL, 0, &res, sizeof(res));
	printf("HOLDREF call=%d id=%d\n", e, res.id);
	coroipcc_service_disconnect(h);
	return e == CS_OK ? 0 : 1;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: test_client all|hold|victim SOCKET\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	sock = argv[2];
	if (strcmp(argv[1], "all") == 0)
		return run_all();
	if (strcmp(argv[1], "hold") == 0)
		return run_hold();
	if (strcmp(argv[1], "victim") == 0)
		return run_victim();
	if (strcmp(argv[1], "holdref") == 0)
		return run_holdref();
	return 2;
}
