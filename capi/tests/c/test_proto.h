/* Messages of test_server.c's service 1, shared with test_client.c. */
#ifndef TEST_PROTO_H
#define TEST_PROTO_H

#include <corosync/coroipc_types.h>

#define TEST_SERVICE 1
#define MISSING_SERVICE 2
#define NO_INIT_SERVICE 3

struct req_dispatch {
	coroipc_request_header_t header;
	int count __attribute__((aligned(8)));
	int size __attribute__((aligned(8)));
};

struct req_int {
	coroipc_request_header_t header;
	int value __attribute__((aligned(8)));
};

struct disp_msg {
	coroipc_response_header_t header;
	int seq __attribute__((aligned(8)));
	int size __attribute__((aligned(8)));
};

struct counters {
	int requests;
	int inits;
	int exits;
	int exit_retries;
	int lock_violations;
	int bad_requests;
	int dirty_private_data;
	int deferred_answers;
	int main_dispatches;
	int security_checks;
	int stats_created;
	int stats_destroyed;
	int stats_increments;
	int poll_adds;
};

struct res_counters {
	coroipc_response_header_t header;
	struct counters counters;
};

#endif
