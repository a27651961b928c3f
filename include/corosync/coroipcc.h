/*
 * coroipc-rs: libcoroipcc.so.4, the client side of coroipc (the ABI of
 * corosync 1.4's coroipcc). Every function returns a cs_error_t; handles
 * are never reused (a destroyed one is CS_ERR_BAD_HANDLE). See README.md
 * ("C ABI") and capi/src/client.rs for the semantics.
 */
#ifndef COROIPCC_H_DEFINED
#define COROIPCC_H_DEFINED

#include <stddef.h>
#include <sys/uio.h>
#include <corosync/coroipc_types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Connects to `service` at the abstract socket "\0" socket_name. A server
 * that cannot be reached is CS_ERR_TRY_AGAIN; refusals pass through
 * (CS_ERR_NOT_EXIST, CS_ERR_SECURITY, CS_ERR_NO_RESOURCES). */
extern cs_error_t coroipcc_service_connect(const char *socket_name, unsigned int service,
	size_t request_size, size_t response_size, size_t dispatch_size, hdb_handle_t *handle);

extern cs_error_t coroipcc_service_disconnect(hdb_handle_t handle);

/* One descriptor per handle, the same every time, level-triggered:
 * readable while a dispatch message is pending and once the server is gone. */
extern cs_error_t coroipcc_fd_get(hdb_handle_t handle, int *fd);

/* timeout in ms as poll(2): 0 = do not wait, -1 = for ever. *buf is a
 * contiguous, aligned message starting with coroipc_response_header_t,
 * valid until coroipcc_dispatch_put. */
extern cs_error_t coroipcc_dispatch_get(hdb_handle_t handle, void **buf, int timeout);

extern cs_error_t coroipcc_dispatch_put(hdb_handle_t handle);

/* 1 while the server holds dispatch messages back for this client. */
extern cs_error_t coroipcc_dispatch_flow_control_get(hdb_handle_t handle, unsigned int *flow_control_state);

/* A request larger than request_size is CS_ERR_INVALID_PARAM. A response
 * whose header.error is CS_ERR_TRY_AGAIN is returned as CS_ERR_TRY_AGAIN;
 * otherwise res_len bytes are copied (zero-filled past the response). */
extern cs_error_t coroipcc_msg_send_reply_receive(hdb_handle_t handle, const struct iovec *iov,
	unsigned int iov_len, void *res_msg, size_t res_len);

/* The response in place, valid until _in_buf_put (in the calling thread). */
extern cs_error_t coroipcc_msg_send_reply_receive_in_buf_get(hdb_handle_t handle, const struct iovec *iov,
	unsigned int iov_len, void **res_msg);

extern cs_error_t coroipcc_msg_send_reply_receive_in_buf_put(hdb_handle_t handle);

/* header_size bytes of caller headroom followed by size bytes. */
extern cs_error_t coroipcc_zcb_alloc(hdb_handle_t handle, void **buffer, size_t size, size_t header_size);

extern cs_error_t coroipcc_zcb_free(hdb_handle_t handle, void *buffer);

/* msg = a buffer of coroipcc_zcb_alloc holding a whole request (header.size bytes). */
extern cs_error_t coroipcc_zcb_msg_send_reply_receive(hdb_handle_t handle, void *msg, void *res_msg,
	size_t res_len);

#ifdef __cplusplus
}
#endif

#endif /* COROIPCC_H_DEFINED */
