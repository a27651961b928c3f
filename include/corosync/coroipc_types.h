/*
 * coroipc-rs: the types shared by libcoroipcs.so.4 and libcoroipcc.so.4,
 * declaring the same ABI as corosync 1.4's coroipc (cs_error_t values,
 * hdb_handle_t, the request and response headers).
 */
#ifndef COROIPC_TYPES_H_DEFINED
#define COROIPC_TYPES_H_DEFINED

#include <stdint.h>

/* corosync's <corosync/corotypes.h> defines the same enum under this guard. */
#ifndef COROTYPES_H_DEFINED
#define COROTYPES_H_DEFINED
typedef enum {
	CS_OK = 1,
	CS_ERR_LIBRARY = 2,
	CS_ERR_VERSION = 3,
	CS_ERR_INIT = 4,
	CS_ERR_TIMEOUT = 5,
	CS_ERR_TRY_AGAIN = 6,
	CS_ERR_INVALID_PARAM = 7,
	CS_ERR_NO_MEMORY = 8,
	CS_ERR_BAD_HANDLE = 9,
	CS_ERR_BUSY = 10,
	CS_ERR_ACCESS = 11,
	CS_ERR_NOT_EXIST = 12,
	CS_ERR_NAME_TOO_LONG = 13,
	CS_ERR_EXIST = 14,
	CS_ERR_NO_SPACE = 15,
	CS_ERR_INTERRUPT = 16,
	CS_ERR_NAME_NOT_FOUND = 17,
	CS_ERR_NO_RESOURCES = 18,
	CS_ERR_NOT_SUPPORTED = 19,
	CS_ERR_BAD_OPERATION = 20,
	CS_ERR_FAILED_OPERATION = 21,
	CS_ERR_MESSAGE_ERROR = 22,
	CS_ERR_QUEUE_FULL = 23,
	CS_ERR_QUEUE_NOT_AVAILABLE = 24,
	CS_ERR_BAD_FLAGS = 25,
	CS_ERR_TOO_BIG = 26,
	CS_ERR_NO_SECTIONS = 27,
	CS_ERR_CONTEXT_NOT_FOUND = 28,
	CS_ERR_TOO_MANY_GROUPS = 30,
	CS_ERR_IN_SHUTDOWN = 31,
	CS_ERR_SECURITY = 100
} cs_error_t;
#endif

/* corosync's <corosync/hdb.h> defines the same typedef under this guard. */
#ifndef HDB_H_DEFINED
typedef uint64_t hdb_handle_t;
#endif

/* Every request starts with this header: size = total length (header
 * included), id = the handler's index in the service's table. */
typedef struct {
	int size __attribute__((aligned(8)));
	int id __attribute__((aligned(8)));
} coroipc_request_header_t __attribute__((aligned(8)));

/* Every response and dispatch message starts with this header. */
typedef struct {
	int size __attribute__((aligned(8)));
	int id __attribute__((aligned(8)));
	cs_error_t error __attribute__((aligned(8)));
} coroipc_response_header_t __attribute__((aligned(8)));

#endif /* COROIPC_TYPES_H_DEFINED */
