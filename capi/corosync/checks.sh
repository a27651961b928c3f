#!/usr/bin/env bash
# The checks of capi/corosync/run.sh, run inside its private network
# namespace (only lo, nothing leaves the machine, the abstract socket
# @corosync.ipc is private to the namespace).
#
#   checks.sh BUILD_DIR OVERLAY_DIR CONFIG
set -uo pipefail
build=$1 overlay=$2 conf=$3
P=$build/prefix T=$build/OBJ/test
lb="stdbuf -oL"   # the test programs do not flush; their output goes to files
work=$(mktemp -d /tmp/capi-corosync.XXXXXX)
export LD_LIBRARY_PATH=$overlay:$P/lib
export COROSYNC_MAIN_CONFIG_FILE=$conf
export COROSYNC_RUN_DIR=$work/run
unset COROSYNC_DEFAULT_CONFIG_IFACE   # would make libconfdb bypass IPC
mkdir -p "$work/run"
pass=0 fail=0 failed=()
ok() { pass=$((pass + 1)); printf 'PASS %-22s %s\n' "$1" "${2:-}"; }
ko() { fail=$((fail + 1)); failed+=("$1"); printf 'FAIL %-22s %s\n' "$1" "${2:-}"; }
check() { # check NAME DETAIL-ON-FAIL COMMAND...
  local name=$1 detail=$2; shift 2
  if "$@"; then ok "$name"; else ko "$name" "$detail"; fi
}
ms() { date +%s%3N; }
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

ip link set lo up
shm_before=$(ls /dev/shm | grep -cE '^(control_buffer|request_buffer|response_buffer|dispatch_buffer|corosync_zerocopy)-' || true)

"$P/sbin/corosync" -f -p >"$work/corosync.log" 2>&1 &
cs=$!
pids+=("$cs")
for _ in $(seq 100); do
  "$P/sbin/corosync-cfgtool" -s >"$work/cfg.out" 2>&1 && break
  sleep 0.1
done
if ! kill -0 "$cs" 2>/dev/null; then
  # e.g. "Another Corosync instance is already running" (its pid file is in
  # the build's prefix, shared by every namespace)
  echo "FAIL corosync-start           $(tail -2 "$work/corosync.log" | tr '\n' ' ')"
  echo "corosync integration: corosync did not start"
  exit 1
fi

# 1. Our libraries are the ones loaded.
check loaded-executive "libcoroipcs.so.4 in /proc/$cs/maps is not $overlay's" \
  grep -q "$overlay/libcoroipcs.so.4" "/proc/$cs/maps"
check loaded-clients "ldd testcpg: $(ldd "$T/testcpg" | grep coroipcc)" \
  sh -c "ldd '$T/testcpg' | grep -q '$overlay/libcoroipcc.so.4'"

# 2. Tools.
check cfgtool-status "$(tr '\n' ' ' <"$work/cfg.out")" grep -q "ring 0 active with no faults" "$work/cfg.out"
nodeid=$(sed -n 's/^Local node ID \([0-9]*\)/\1/p' "$work/cfg.out")
check cfgtool-addrs "node $nodeid" sh -c "timeout 10 '$P/sbin/corosync-cfgtool' -a '$nodeid' | grep -q 127.0.0.1"
t0=$(ms)
check cfgtool-reenable "deferred response" timeout 10 "$P/sbin/corosync-cfgtool" -r
echo "     (cfgtool -r answered in $(($(ms) - t0)) ms)"
check quorumtool "not quorate" sh -c "timeout 10 '$P/sbin/corosync-quorumtool' -s | grep -qE 'Quorate: +Yes'"
timeout 10 "$P/sbin/corosync-objctl" -a >"$work/objctl.out" 2>&1
keys=$(wc -l <"$work/objctl.out")
check objctl-dump "$keys keys" test "$keys" -gt 100
echo "     ($keys keys)"
check ipc-stats "no runtime.connections" sh -c "grep -qE '^runtime.connections.active=' '$work/objctl.out' && grep -qE '^runtime.connections.corosync-objctl:CONFDB:[0-9]+:[0-9]+.service_id=11' '$work/objctl.out'"
timeout 10 "$P/sbin/corosync-objctl" -c capitest >/dev/null 2>&1
timeout 10 "$P/sbin/corosync-objctl" -w capitest.key=hello-coroipc-rs >/dev/null 2>&1
check objctl-write "read back" sh -c "timeout 10 '$P/sbin/corosync-objctl' -a | grep -q '^capitest.key=hello-coroipc-rs'"

# confdb change notifications: dispatch messages sent from another
# connection's handler, through confdb's notify pipe.
timeout 10 "$P/sbin/corosync-objctl" -c capitrack >/dev/null 2>&1
(sleep 2) | $lb "$P/sbin/corosync-objctl" -t capitrack >"$work/track.out" 2>&1 &
tr=$!
sleep 0.5
for i in 1 2 3 4 5; do timeout 10 "$P/sbin/corosync-objctl" -w "capitrack.k$i=v$i" >/dev/null 2>&1; done
wait $tr
n=$(grep -c '^key_changed> capitrack.k' "$work/track.out")
check objctl-track "$n of 5 notifications" test "$n" = 5

# 3. Test programs.
timeout 20 "$T/testconfdb" >"$work/testconfdb.out" 2>&1
rc=$?
check testconfdb "rc $rc, $(wc -l <"$work/testconfdb.out") lines" sh -c "[ $rc = 0 ] && [ $(wc -l <"$work/testconfdb.out") -gt 50 ] && ! grep -q '^error' '$work/testconfdb.out'"

timeout 20 "$T/testconfdb" write >"$work/testconfdb-w.out" 2>&1
rc=$?
check testconfdb-write "rc $rc" sh -c "[ $rc = 0 ] && grep -q 'Finalize  result is 1' '$work/testconfdb-w.out'"

timeout 20 $lb "$T/testcpg2" >"$work/testcpg2.out" 2>&1
rc=$?
check testcpg2 "rc $rc" sh -c "[ $rc = 0 ] && grep -q '^confchg nodeid' '$work/testcpg2.out'"

# testcpgzc: one zero-copy message, then leave.
printf 'zc-hello\nEXIT\n' | timeout 20 "$T/testcpgzc" >"$work/testcpgzc.out" 2>&1
check testcpgzc "$(tail -1 "$work/testcpgzc.out")" grep -q "'zc-hello" "$work/testcpgzc.out"

t0=$(ms)
timeout 30 "$T/testzcgc" >"$work/testzcgc.out" 2>&1
rc=$?
check testzcgc "rc $rc" test $rc = 0
echo "     (100 x 1 MiB zcb left at exit: $(($(ms) - t0)) ms)"

t0=$(ms)
timeout 120 "$T/stress_cpgzc" >"$work/stress_cpgzc.out" 2>&1
check stress_cpgzc "$(tail -1 "$work/stress_cpgzc.out")" grep -q '^PASS' "$work/stress_cpgzc.out"
echo "     (200,000 zcb alloc+free and 400,000 round trips in $(($(ms) - t0)) ms)"

timeout 30 "$T/testevs" >"$work/testevs.out" 2>&1
rc=$?
n=$(grep -c 'This is message' "$work/testevs.out")
check testevs "rc $rc, $n deliveries" sh -c "[ $rc = 0 ] && [ $n -gt 100 ]"

t0=$(ms)
timeout 60 "$T/cpgverify" -i 2000 >"$work/cpgverify.out" 2>&1
rc=$?
verified=$(grep -c '^SIZE' "$work/cpgverify.out")
check cpgverify "rc $rc, $verified verified" sh -c "[ $rc = 0 ] && [ $verified -gt 1900 ] && ! grep -q 'incorrect hash' '$work/cpgverify.out'"
echo "     ($verified of 2000 verified in $(($(ms) - t0)) ms)"

t0=$(ms)
timeout 30 "$T/stress_cpgfdget" >"$work/fdget.out" 2>&1
check stress_cpgfdget "$(tail -1 "$work/fdget.out")" grep -q '^PASS' "$work/fdget.out"
echo "     (2,000,000 fd_get in $(($(ms) - t0)) ms)"

t0=$(ms)
threads_max=0
timeout 60 "$T/stress_cpgcontext" >"$work/context.out" 2>&1 &
sc=$!
while kill -0 $sc 2>/dev/null; do
  n=$(ls "/proc/$cs/task" 2>/dev/null | wc -l)
  [ "$n" -gt "$threads_max" ] && threads_max=$n
  sleep 0.2
done
wait $sc
check stress_cpgcontext "$(tail -1 "$work/context.out")" grep -q '^PASS' "$work/context.out"
echo "     (100 connections in $(($(ms) - t0)) ms; corosync peaked at $threads_max threads)"

timeout 13 $lb "$T/cpgbench" >"$work/cpgbench.out" 2>&1
line=$(grep -m1 'messages received' "$work/cpgbench.out")
check cpgbench "no round finished" test -n "$line"
echo "     ($line)"

# testcpg: two members; one SIGKILLed, the other sees it leave (PROCDOWN, 5).
mkfifo "$work/in1" "$work/in2"
$lb "$T/testcpg" <"$work/in1" >"$work/cpg1.out" 2>&1 &
c1=$!; pids+=("$c1")
exec 7>"$work/in1"
$lb "$T/testcpg" <"$work/in2" >"$work/cpg2.out" 2>&1 &
c2=$!; pids+=("$c2")
exec 8>"$work/in2"
for _ in $(seq 100); do
  grep -q 'Type EXIT' "$work/cpg1.out" && grep -q 'Type EXIT' "$work/cpg2.out" && break
  sleep 0.1
done
echo "hello-from-one" >&7
for _ in $(seq 100); do
  grep -q "'hello-from-one" "$work/cpg2.out" && break
  sleep 0.1
done
check testcpg-deliver "member 2 saw member 1's message" grep -q "'hello-from-one" "$work/cpg2.out"
timeout 10 "$P/sbin/corosync-cpgtool" >"$work/cpgtool.out" 2>&1
check cpgtool "$(tr '\n\t' '  ' <"$work/cpgtool.out")" sh -c "grep -q GROUP '$work/cpgtool.out' && grep -qw $c1 '$work/cpgtool.out' && grep -qw $c2 '$work/cpgtool.out'"
kill -KILL "$c2"; wait "$c2" 2>/dev/null
for _ in $(seq 100); do
  grep -qE "left .*/$c2 reason: 5" "$work/cpg1.out" && break
  sleep 0.1
done
check testcpg-kill "no PROCDOWN leave of $c2" grep -qE "left .*/$c2 reason: 5" "$work/cpg1.out"

# shutdown with a client still joined: corosync exits 0, the client errors out.
t0=$(ms)
kill -TERM "$cs"
for _ in $(seq 100); do kill -0 "$cs" 2>/dev/null || break; sleep 0.1; done
wait "$cs"
rc=$?
check shutdown-live-client "corosync rc $rc" test $rc = 0
for _ in $(seq 50); do kill -0 "$c1" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$c1" 2>/dev/null; then ko client-sees-shutdown "testcpg still running"; else
  wait "$c1"; rc=$?
  check client-sees-shutdown "testcpg rc $rc" test $rc != 0
fi
echo "     (corosync stopped in $(($(ms) - t0)) ms)"
exec 7>&- 8>&-

shm_after=$(ls /dev/shm | grep -cE '^(control_buffer|request_buffer|response_buffer|dispatch_buffer|corosync_zerocopy)-' || true)
check shm-leaks "$shm_before -> $shm_after coroipc files in /dev/shm" test "$shm_after" -le "$shm_before"
check corosync-log "$(grep -iE 'assert|fatal|Could not accept|Invalid IPC credentials' "$work/corosync.log" | head -2)" \
  sh -c "! grep -qiE 'assert|fatal|Could not accept|Invalid IPC credentials' '$work/corosync.log'"

echo "corosync integration: $pass passed, $fail failed${failed:+ (${failed[*]})}"
[ "$fail" = 0 ]
