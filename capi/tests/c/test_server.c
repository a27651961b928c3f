/*
 * A miniature executive over libcoroipcs.so.4, written against
 * include/corosync/coroipcs.h only: it fills struct coroipcs_init_state_v2
 * the way corosync's exec/main.c does (a non-recursive, error-checking
 * serialize_lock; a poll loop for libraries that register descriptors;
 * stats callbacks) and offers service 1 ("test") with these handlers:
 *
 *   0  echo: answers header + the request's payload
 *   1  deferred: answers 20 ms later from another thread (refcount held)
 *   2  dispatch {count, size}: sends count messages of size bytes, then answers
 *   3  refused by sending_allowed (0: the library answers CS_ERR_TRY_AGAIN)
 *   4  refused by sending_allowed (-1: CS_ERR_INVALID_PARAM)
 *   5  counters: answers struct counters
 *   6  busy exit: this connection's exit_fn returns -1 three times first
 *   7  deny: the next connect is refused by security_valid (errno = payload int)
 *   8  dispatch from the main thread, under serialize_lock ({count, size})
 *   9  rr64: answers 64 bytes (header + the request's bytes 16..56)
 *  10  silent: never answers
 *  11  hold: takes a reference (refcount_inc) on the connection; once its
 *      exit_fn ran, the main thread sends to it, drops the reference and
 *      prints "HELD freed_before=F dispatch=D response=R freed_after=F"
 *
 * Service 2 is not available; service 3 has no init function.
 *
 *   test_server SOCKET_NAME      prints "READY" once listening; SIGTERM:
 *                                ipc_service_exit until 0, prints "EXIT ...".
 *   test_server SOCKET_NAME v1   the same set up with coroipcs_ipc_init (struct
 *                                coroipcs_init_state, no stats); SIGTERM:
 *                                coroipcs_ipc_exit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include <corosync/coroipcs.h>

#include "test_proto.h"

static pthread_mutex_t big_lock;
static pthread_t big_owner;
static int big_held;
static pthread_mutex_t counters_mutex = PTHREAD_MUTEX_INITIALIZER;
static struct counters counters;
static volatile sig_atomic_t stop;
static int deny_errno;

#define COUNT(field) do { pthread_mutex_lock(&counters_mutex); counters.field++; \
	pthread_mutex_unlock(&counters_mutex); } while (0)

static int lock_held_here(void)
{
	return big_held && pthread_equal(big_owner, pthread_self());
}

static void check_locked(void)
{
	if (!lock_held_here())
		COUNT(lock_violations);
}

static void serialize_lock(void)
{
	int r = pthread_mutex_lock(&big_lock);
	if (r != 0) {
		fprintf(stderr, "serialize_lock: %s\n", strerror(r));
		abort();
	}
	big_owner = pthread_self();
	big_held = 1;
}

static void serialize_unlock(void)
{
	big_held = 0;
	pthread_mutex_unlock(&big_lock);
}

struct pd {
	int magic_zero[16];	/* must be zero at init */
	int busy_exits;		/* exit_fn returns -1 this many times */
	int exited;		/* exit_fn returned 0 */
};

/* The connection held by handler 11, and whether the library freed its
 * private data (through the executive's free, below). */
static void *held_conn;
static struct pd *held_pd;
static volatile int held_pd_freed;

static void counting_free(void *p)
{
	if (p != NULL && p == (void *)held_pd)
		held_pd_freed = 1;
	free(p);
}

static int service_available(unsigned int service)
{
	return service == 1 || service == 3;
}

static int private_data_size_get(unsigned int service)
{
	(void)service;
	return sizeof(struct pd);
}

static int security_valid(int uid, int gid)
{
	(void)uid; (void)gid;
	COUNT(security_checks);
	if (deny_errno) {
		errno = deny_errno;
		deny_errno = 0;
		return 0;
	}
	return 1;
}

static int sending_allowed(unsigned int service, unsigned int id, const void *msg, void *pd)
{
	const coroipc_request_header_t *h = msg;
	(void)service;
	check_locked();
	if ((uintptr_t)msg % 8 != 0 || h->id != (int)id)
		COUNT(bad_requests);
	*(int *)pd = 1;
	if (id == 3)
		return 0;
	if (id == 4)
		return -1;
	return 1;
}

static void sending_allowed_release(void *pd)
{
	check_locked();
	if (*(int *)pd != 1)
		COUNT(bad_requests);
	*(int *)pd = 0;
}

/* The poll loop, for libraries that register descriptors (the original). */
#define MAX_FDS 1024
static struct pollfd pfds[MAX_FDS];
static void *pctx[MAX_FDS];
static int pkind[MAX_FDS];	/* 1 accept, 2 dispatch */
static int npfds;
static pthread_mutex_t poll_mutex = PTHREAD_MUTEX_INITIALIZER;

static void poll_add(int fd, int kind, void *ctx)
{
	pthread_mutex_lock(&poll_mutex);
	if (npfds < MAX_FDS) {
		pfds[npfds].fd = fd;
		pfds[npfds].events = POLLIN | POLLNVAL;
		pctx[npfds] = ctx;
		pkind[npfds] = kind;
		npfds++;
	}
	pthread_mutex_unlock(&poll_mutex);
}

static void poll_accept_add(int fd) { COUNT(poll_adds); poll_add(fd, 1, NULL); }
static void poll_dispatch_add(int fd, void *ctx) { COUNT(poll_adds); poll_add(fd, 2, ctx); }

static void poll_dispatch_modify(int fd, int events)
{
	pthread_mutex_lock(&poll_mutex);
	for (int i = 0; i < npfds; i++)
		if (pfds[i].fd == fd)
			pfds[i].events = events;
	pthread_mutex_unlock(&poll_mutex);
}

static void poll_remove_at(int i)
{
	pfds[i] = pfds[npfds - 1];
	pctx[i] = pctx[npfds - 1];
	pkind[i] = pkind[npfds - 1];
	npfds--;
}

static void poll_dispatch_destroy(int fd, void *ctx)
{
	(void)ctx;
	pthread_mutex_lock(&poll_mutex);
	for (int i = 0; i < npfds; i++)
		if (pfds[i].fd == fd) {
			poll_remove_at(i);
			break;
		}
	pthread_mutex_unlock(&poll_mutex);
}

static void fatal_error(const char *msg) __attribute__((noreturn));
static void fatal_error(const char *msg)
{
	fprintf(stderr, "fatal: %s\n", msg);
	exit(1);
}

static int init_fn(void *conn)
{
	struct pd *pd = coroipcs_private_data_get(conn);
	check_locked();
	COUNT(inits);
	for (unsigned i = 0; i < sizeof(pd->magic_zero) / sizeof(int); i++)
		if (pd->magic_zero[i] != 0)
			COUNT(dirty_private_data);
	return 0;
}

static int exit_fn(void *conn)
{
	struct pd *pd = coroipcs_private_data_get(conn);
	check_locked();
	if (pd->busy_exits > 0) {
		pd->busy_exits--;
		COUNT(exit_retries);
		return -1;
	}
	pd->exited = 1;
	COUNT(exits);
	printf("EXITFN exits=%d\n", counters.exits);
	fflush(stdout);
	return 0;
}

static coroipcs_init_fn_lvalue init_fn_get(unsigned int service)
{
	return service == 1 ? init_fn : NULL;
}

static coroipcs_exit_fn_lvalue exit_fn_get(unsigned int service)
{
	(void)service;
	return exit_fn;
}

static void respond_header(void *conn, int id, cs_error_t error)
{
	coroipc_response_header_t res = { .size = sizeof(res), .id = id, .error = error };
	coroipcs_response_send(conn, &res, sizeof(res));
}

static void h_echo(void *conn, const void *msg)
{
	const coroipc_request_header_t *req = msg;
	coroipc_response_header_t res;
	struct iovec iov[2];
	check_locked();
	COUNT(requests);
	res.size = sizeof(res) + req->size - sizeof(*req);
	res.id = 100;
	res.error = CS_OK;
	iov[0].iov_base = &res;
	iov[0].iov_len = sizeof(res);
	iov[1].iov_base = (char *)msg + sizeof(*req);
	iov[1].iov_len = req->size - sizeof(*req);
	coroipcs_response_iov_send(conn, iov, 2);
}

static void *deferred_thread(void *conn)
{
	usleep(20000);
	/* Not holding serialize_lock: response_send must not need it. */
	respond_header(conn, 101, CS_OK);
	COUNT(deferred_answers);
	coroipcs_refcount_dec(conn);
	return NULL;
}

static void h_deferred(void *conn, const void *msg)
{
	pthread_t t;
	(void)msg;
	check_locked();
	COUNT(requests);
	coroipcs_refcount_inc(conn);
	pthread_create(&t, NULL, deferred_thread, conn);
	pthread_detach(t);
}

static void send_dispatches(void *conn, const struct req_dispatch *req)
{
	static char buf[1 << 20];
	struct disp_msg *m = (struct disp_msg *)buf;
	int size = req->size;
	if (size < (int)sizeof(*m))
		size = sizeof(*m);
	if (size > (int)sizeof(buf))
		size = sizeof(buf);
	for (int i = 0; i < req->count; i++) {
		memset(buf, 0, size);
		m->header.size = size;
		m->header.id = 200;
		m->header.error = CS_OK;
		m->seq = i;
		m->size = size;
		for (int j = sizeof(*m); j < size; j++)
			buf[j] = (char)(i + j);
		coroipcs_dispatch_send(conn, buf, size);
	}
}

static void h_dispatch(void *conn, const void *msg)
{
	check_locked();
	COUNT(requests);
	send_dispatches(conn, msg);
	respond_header(conn, 102, CS_OK);
}

static void h_counters(void *conn, const void *msg)
{
	struct res_counters res;
	(void)msg;
	check_locked();
	pthread_mutex_lock(&counters_mutex);
	counters.requests++;
	res.counters = counters;
	pthread_mutex_unlock(&counters_mutex);
	res.header.size = sizeof(res);
	res.header.id = 105;
	res.header.error = CS_OK;
	coroipcs_response_send(conn, &res, sizeof(res));
}

static void h_busy_exit(void *conn, const void *msg)
{
	struct pd *pd = coroipcs_private_data_get(conn);
	(void)msg;
	check_locked();
	COUNT(requests);
	pd->busy_exits = 3;
	respond_header(conn, 106, CS_OK);
}

static void h_deny(void *conn, const void *msg)
{
	const struct req_int *req = msg;
	check_locked();
	COUNT(requests);
	deny_errno = req->value;
	respond_header(conn, 107, CS_OK);
}

/* Main-thread dispatch work, done under serialize_lock as corosync's totem
 * deliveries are. */
static pthread_mutex_t work_mutex = PTHREAD_MUTEX_INITIALIZER;
static void *work_conn;
static struct req_dispatch work_req;

static void h_main_dispatch(void *conn, const void *msg)
{
	check_locked();
	COUNT(requests);
	coroipcs_refcount_inc(conn);
	pthread_mutex_lock(&work_mutex);
	work_conn = conn;
	work_req = *(const struct req_dispatch *)msg;
	pthread_mutex_unlock(&work_mutex);
	/* answered from the main thread */
}

static void main_thread_work(void)
{
	void *conn;
	pthread_mutex_lock(&work_mutex);
	conn = work_conn;
	work_conn = NULL;
	pthread_mutex_unlock(&work_mutex);
	if (!conn)
		return;
	serialize_lock();
	send_dispatches(conn, &work_req);
	respond_header(conn, 108, CS_OK);
	COUNT(main_dispatches);
	serialize_unlock();
	coroipcs_refcount_dec(conn);
}

static void h_rr64(void *conn, const void *msg)
{
	char out[64];
	coroipc_response_header_t *res = (void *)out;
	const coroipc_request_header_t *req = msg;
	size_t n = req->size > (int)sizeof(*req) ? (size_t)req->size - sizeof(*req) : 0;
	if (n > sizeof(out) - sizeof(*res))
		n = sizeof(out) - sizeof(*res);
	memset(out, 0, sizeof(out));
	memcpy(out + sizeof(*res), (const char *)msg + sizeof(*req), n);
	res->size = sizeof(out);
	res->id = 109;
	res->error = CS_OK;
	coroipcs_response_send(conn, out, sizeof(out));
}

static void h_hold(void *conn, const void *msg)
{
	(void)msg;
	check_locked();
	COUNT(requests);
	coroipcs_refcount_inc(conn);
	held_pd = coroipcs_private_data_get(conn);
	held_conn = conn;
	respond_header(conn, 111, CS_OK);
}

/* Main thread, under serialize_lock: once the held connection's exit_fn
 * ran, its memory must still be there; sending to it must be harmless;
 * dropping the last reference frees it. */
static void held_work(void)
{
	int before, d, r;
	coroipc_response_header_t m = { .size = sizeof(m), .id = 300, .error = CS_OK };
	serialize_lock();
	if (held_conn == NULL || !held_pd->exited) {
		serialize_unlock();
		return;
	}
	before = held_pd_freed;
	d = coroipcs_dispatch_send(held_conn, &m, sizeof(m));
	r = coroipcs_response_send(held_conn, &m, sizeof(m));
	coroipcs_refcount_dec(held_conn);
	held_conn = NULL;
	serialize_unlock();
	printf("HELD freed_before=%d dispatch=%d response=%d freed_after=%d\n", before, d, r, held_pd_freed);
	fflush(stdout);
}

static void h_silent(void *conn, const void *msg)
{
	(void)conn; (void)msg;
	check_locked();
	COUNT(requests);
}

static coroipcs_handler_fn_lvalue handler_fn_get(unsigned int service, unsigned int id)
{
	static coroipcs_handler_fn_lvalue table[] = {
		h_echo, h_deferred, h_dispatch, h_echo, h_echo, h_counters, h_busy_exit, h_deny, h_main_dispatch,
		h_rr64, h_silent, h_hold,
	};
	(void)service;
	if (id >= sizeof(table) / sizeof(table[0]))
		return NULL;
	return table[id];
}

static hdb_handle_t stats_create_connection(const char *name, pid_t pid, int fd)
{
	(void)name; (void)pid; (void)fd;
	COUNT(stats_created);
	return 1000 + counters.stats_created;
}

static void stats_destroy_connection(hdb_handle_t h) { (void)h; COUNT(stats_destroyed); }
static void stats_update_value(hdb_handle_t h, const char *n, const void *v, size_t l)
{ (void)h; (void)n; (void)v; (void)l; }
static void stats_increment_value(hdb_handle_t h, const char *n) { (void)h; (void)n; COUNT(stats_increments); }
static void stats_decrement_value(hdb_handle_t h, const char *n) { (void)h; (void)n; }

static void log_printf(unsigned int rec, const char *fn, const char *file, int line, const char *fmt, ...)
{
	(void)rec; (void)fn; (void)file; (void)line; (void)fmt;
}

/* Exported (the program is linked with -rdynamic) as corosync's exec/util.c
 * exports it: the original library names its stats objects with it. */
const char *short_service_name_get(uint32_t service_id, char *buf, size_t buf_size);
const char *short_service_name_get(uint32_t service_id, char *buf, size_t buf_size)
{
	snprintf(buf, buf_size, service_id == 1 ? "TST" : "S%u", service_id);
	return buf;
}

static void on_term(int sig) { (void)sig; stop = 1; }

static struct coroipcs_init_state_v2 state = {
	.sched_policy = 0,
	.malloc = malloc,
	.free = counting_free,
	.service_available = service_available,
	.private_data_size_get = private_data_size_get,
	.security_valid = security_valid,
	.serialize_lock = serialize_lock,
	.serialize_unlock = serialize_unlock,
	.sending_allowed = sending_allowed,
	.sending_allowed_release = sending_allowed_release,
	.poll_accept_add = poll_accept_add,
	.poll_dispatch_add = poll_dispatch_add,
	.poll_dispatch_modify = poll_dispatch_modify,
	.poll_dispatch_destroy = poll_dispatch_destroy,
	.fatal_error = fatal_error,
	.init_fn_get = init_fn_get,
	.exit_fn_get = exit_fn_get,
	.handler_fn_get = handler_fn_get,
	.stats_create_connection = stats_create_connection,
	.stats_destroy_connection = stats_destroy_connection,
	.stats_update_value = stats_update_value,
	.stats_increment_value = stats_increment_value,
	.log_printf = log_printf,
	.stats_decrement_value = stats_decrement_value,
};

int main(int argc, char **argv)
{
	pthread_mutexattr_t attr;
	struct sched_param sp = { 0 };
	if (argc < 2) {
		fprintf(stderr, "usage: test_server SOCKET_NAME\n");
		return 2;
	}
	pthread_mutexattr_init(&attr);
	pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
	pthread_mutex_init(&big_lock, &attr);
	signal(SIGTERM, on_term);
	signal(SIGPIPE, SIG_IGN);
	state.socket_name = argv[1];
	state.sched_param = &sp;
	if (argc > 2 && strcmp(argv[2], "v1") == 0) {
		static struct coroipcs_init_state v1;
		v1.socket_name = state.socket_name;
		v1.sched_param = state.sched_param;
		v1.malloc = malloc;
		v1.free = free;
		v1.service_available = service_available;
		v1.private_data_size_get = private_data_size_get;
		v1.security_valid = security_valid;
		v1.serialize_lock = serialize_lock;
		v1.serialize_unlock = serialize_unlock;
		v1.sending_allowed = sending_allowed;
		v1.sending_allowed_release = sending_allowed_release;
		v1.poll_accept_add = poll_accept_add;
		v1.poll_dispatch_add = poll_dispatch_add;
		v1.poll_dispatch_modify = poll_dispatch_modify;
		v1.poll_dispatch_destroy = poll_dispatch_destroy;
		v1.fatal_error = fatal_error;
		v1.init_fn_get = init_fn_get;
		v1.exit_fn_get = exit_fn_get;
		v1.handler_fn_get = handler_fn_get;
		coroipcs_ipc_init(&v1);
		printf("READY\n");
		fflush(stdout);
		while (!stop)
			usleep(5000);
		coroipcs_ipc_exit();
		/* Teardown runs in the library's own thread: wait for it. */
		for (int i = 0; i < 1000 && counters.exits < counters.inits; i++)
			usleep(5000);
		printf("EXIT v1 inits=%d exits=%d lock_violations=%d\n", counters.inits, counters.exits,
		       counters.lock_violations);
		return 0;
	}
	state.old_log_printf = (void (*)(const char *, ...))1;	/* must be cleared */
	coroipcs_ipc_init_v2(&state);
	if (state.old_log_printf != NULL) {
		fprintf(stderr, "old_log_printf not cleared\n");
		return 1;
	}
	/* A library that registers no descriptors never needs its poll entry
	 * points, which must still be there and harmless. */
	if (npfds == 0)
		printf("POLL unused accept=%d dispatch=%d\n", coroipcs_handler_accept(-1, POLLIN, NULL),
		       coroipcs_handler_dispatch(-1, POLLIN, NULL));
	printf("READY\n");
	fflush(stdout);
	while (!stop) {
		struct pollfd snap[MAX_FDS];
		int n;
		pthread_mutex_lock(&poll_mutex);
		n = npfds;
		memcpy(snap, pfds, n * sizeof(snap[0]));
		pthread_mutex_unlock(&poll_mutex);
		if (poll(snap, n, 5) > 0) {
			for (int i = 0; i < n; i++) {
				int k = -1, r;
				void *ctx = NULL;
				if (!snap[i].revents)
					continue;
				pthread_mutex_lock(&poll_mutex);
				for (int j = 0; j < npfds; j++)
					if (pfds[j].fd == snap[i].fd) {
						k = pkind[j];
						ctx = pctx[j];
					}
				pthread_mutex_unlock(&poll_mutex);
				if (k == 1)
					r = coroipcs_handler_accept(snap[i].fd, snap[i].revents, ctx);
				else if (k == 2)
					r = coroipcs_handler_dispatch(snap[i].fd, snap[i].revents, ctx);
				else
					continue;
				if (r == -1)
					poll_dispatch_destroy(snap[i].fd, ctx);
			}
		}
		main_thread_work();
		held_work();
	}
	/* corosync's shutdown: ipc_service_exit until it says 0. */
	for (int tries = 0; coroipcs_ipc_service_exit(1) == -1; tries++) {
		struct pollfd snap[MAX_FDS];
		int n;
		if (tries > 2000) {
			printf("EXIT stuck\n");
			return 1;
		}
		pthread_mutex_lock(&poll_mutex);
		n = npfds;
		memcpy(snap, pfds, n * sizeof(snap[0]));
		pthread_mutex_unlock(&poll_mutex);
		poll(snap, n, 5);
		for (int i = 0; i < n; i++)
			if (snap[i].revents && pkind[i] == 2 &&
			    coroipcs_handler_dispatch(snap[i].fd, snap[i].revents, pctx[i]) == -1)
				poll_dispatch_destroy(snap[i].fd, pctx[i]);
	}
	printf("EXIT inits=%d exits=%d lock_violations=%d\n", counters.inits, counters.exits,
	       counters.lock_violations);
	return 0;
}
