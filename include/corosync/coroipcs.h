/*
 * coroipc-rs: libcoroipcs.so.4, the server side of coroipc (the ABI of
 * corosync 1.4's coroipcs). See README.md ("C ABI") and
 * capi/src/server.rs for the threads and locks each callback is called
 * with.
 */
#ifndef COROIPCS_H_DEFINED
#define COROIPCS_H_DEFINED

#include <stddef.h>
#include <sys/types.h>
#include <sched.h>
#include <corosync/coroipc_types.h>

#ifdef __cplusplus
extern "C" {
#endif

struct iovec;

typedef int (*coroipcs_init_fn_lvalue) (void *conn);
typedef int (*coroipcs_exit_fn_lvalue) (void *conn);
typedef void (*coroipcs_handler_fn_lvalue) (void *conn, const void *msg);

/* Version 1 (168 bytes on x86_64): no stats callbacks. */
struct coroipcs_init_state {
	const char *socket_name;
	int sched_policy;
	const struct sched_param *sched_param;
	void *(*malloc) (size_t size);
	void (*free) (void *ptr);
	void (*log_printf) (const char *format, ...) __attribute__((format(printf, 1, 2)));
	int (*service_available)(unsigned int service);
	int (*private_data_size_get)(unsigned int service);
	int (*security_valid)(int uid, int gid);
	void (*serialize_lock)(void);
	void (*serialize_unlock)(void);
	int (*sending_allowed)(unsigned int service, unsigned int id, const void *msg,
		void *sending_allowed_private_data);
	void (*sending_allowed_release)(void *sending_allowed_private_data);
	void (*poll_accept_add)(int fd);
	void (*poll_dispatch_add)(int fd, void *context);
	void (*poll_dispatch_modify)(int fd, int events);
	void (*poll_dispatch_destroy)(int fd, void *context);
	void (*fatal_error)(const char *error_msg) __attribute__ ((noreturn));
	coroipcs_init_fn_lvalue (*init_fn_get)(unsigned int service);
	coroipcs_exit_fn_lvalue (*exit_fn_get)(unsigned int service);
	coroipcs_handler_fn_lvalue (*handler_fn_get)(unsigned int service, unsigned int id);
};

/* Version 2 (224 bytes on x86_64). */
struct coroipcs_init_state_v2 {
	const char *socket_name;
	int sched_policy;
	const struct sched_param *sched_param;
	void *(*malloc) (size_t size);
	void (*free) (void *ptr);
	void (*old_log_printf) (const char *format, ...) __attribute__((format(printf, 1, 2)));
	int (*service_available)(unsigned int service);
	int (*private_data_size_get)(unsigned int service);
	int (*security_valid)(int uid, int gid);
	void (*serialize_lock)(void);
	void (*serialize_unlock)(void);
	int (*sending_allowed)(unsigned int service, unsigned int id, const void *msg,
		void *sending_allowed_private_data);
	void (*sending_allowed_release)(void *sending_allowed_private_data);
	void (*poll_accept_add)(int fd);
	void (*poll_dispatch_add)(int fd, void *context);
	void (*poll_dispatch_modify)(int fd, int events);
	void (*poll_dispatch_destroy)(int fd, void *context);
	void (*fatal_error)(const char *error_msg) __attribute__ ((noreturn));
	coroipcs_init_fn_lvalue (*init_fn_get)(unsigned int service);
	coroipcs_exit_fn_lvalue (*exit_fn_get)(unsigned int service);
	coroipcs_handler_fn_lvalue (*handler_fn_get)(unsigned int service, unsigned int id);
	/* v2 */
	hdb_handle_t (*stats_create_connection) (const char *name, pid_t pid, int fd);
	void (*stats_destroy_connection) (hdb_handle_t handle);
	void (*stats_update_value) (hdb_handle_t handle, const char *name, const void *value, size_t value_len);
	void (*stats_increment_value) (hdb_handle_t handle, const char *name);
	void (*log_printf) (unsigned int rec_ident, const char *function_name, const char *file_name,
		int file_line, const char *format, ...) __attribute__((format(printf, 5, 6)));
	int log_subsys_id;
	void (*stats_decrement_value) (hdb_handle_t handle, const char *name);
};

extern void coroipcs_ipc_init(struct coroipcs_init_state *init_state);
extern void coroipcs_ipc_init_v2(struct coroipcs_init_state_v2 *init_state_v2);

/* The executive's poll-loop entry points (never needed with coroipc-rs,
 * which runs its own event loop and never calls poll_accept_add). */
extern int coroipcs_handler_accept(int fd, int revent, void *context);
extern int coroipcs_handler_dispatch(int fd, int revent, void *context);

/* Zeroed, private_data_size_get(service) bytes, until the connection is freed. */
extern void *coroipcs_private_data_get(void *conn);

/* Answers the oldest unanswered request of conn: any thread, never blocks. */
extern int coroipcs_response_send(void *conn, const void *msg, size_t mlen);
extern int coroipcs_response_iov_send(void *conn, const struct iovec *iov, unsigned int iov_len);

/* Any thread, never blocks; a full client ring queues (flow control on). */
extern int coroipcs_dispatch_send(void *conn, const void *msg, size_t mlen);
extern int coroipcs_dispatch_iov_send(void *conn, const struct iovec *iov, unsigned int iov_len);

extern void coroipcs_refcount_inc(void *conn);
extern void coroipcs_refcount_dec(void *conn);

/* -1 ("call again") while connections of service remain, then 0. */
extern int coroipcs_ipc_service_exit(unsigned int service);
extern void coroipcs_ipc_exit(void);

#ifdef __cplusplus
}
#endif

#endif /* COROIPCS_H_DEFINED */
