# Helpers for guest test scripts; installed as /lib/guest/lib.sh in the
# initramfs and sourced before the test script runs. Busybox sh.
#
#   pass NAME                  GUEST-PASS NAME
#   fail NAME REASON...        GUEST-FAIL NAME: REASON  (the run fails)
#   skip NAME REASON...        GUEST-SKIP NAME: REASON
#   info TEXT...               GUEST-INFO TEXT
#   check NAME CMD [ARG...]    runs CMD: pass when it exits 0, else fail with
#                              its status and the tail of its output
#   expect_eq NAME GOT WANT    pass when GOT = WANT, else fail showing both
#   guest_say LINE             writes a raw line to the console and marker port
#
# Lines go to the console and, when the kernel command line has
# guest.markers=/dev/ttyS1 (set by scripts/guest/lib.sh), also to that port
# so the host reads them without kernel messages in between.

guest_say() {
    echo "$*"
    if [ -z "${GUEST_MARKER_DEV+x}" ]; then
        GUEST_MARKER_DEV=$(sed -n 's/.*guest\.markers=\([^ ]*\).*/\1/p' /proc/cmdline 2>/dev/null)
    fi
    if [ -n "$GUEST_MARKER_DEV" ]; then
        echo "$*" >"$GUEST_MARKER_DEV" 2>/dev/null
    fi
    return 0
}

pass() {
    touch /tmp/.guest-results
    guest_say "GUEST-PASS $1"
}

fail() {
    name=$1
    shift
    touch /tmp/.guest-results /tmp/.guest-failed
    # One line per marker: a multi-line reason is folded.
    guest_say "GUEST-FAIL $name: $(echo "$*" | tr '\n' ' ' | sed 's/ *$//')"
    return 0
}

skip() {
    name=$1
    shift
    touch /tmp/.guest-results
    guest_say "GUEST-SKIP $name: $*"
}

info() {
    guest_say "GUEST-INFO $*"
}

check() {
    name=$1
    shift
    if check_out=$("$@" 2>&1); then
        pass "$name"
    else
        check_rc=$?
        fail "$name" "'$*' exited with status $check_rc: $(echo "$check_out" | tail -n 5)"
        return 1
    fi
}

expect_eq() {
    if [ "$2" = "$3" ]; then
        pass "$1"
    else
        fail "$1" "got '$2', want '$3'"
        return 1
    fi
}

# run_l2 NAME SECONDS CMD [ARG...]
# For nested (L1) test scripts: runs CMD (e.g. the vmm booting an L2 guest
# whose initramfs came from scripts/guest/mkinitramfs) for at most SECONDS,
# logs its output to /tmp/l2-NAME.log and relays the L2 guest's markers live
# as L1 markers: "GUEST-PASS NAME/x", "GUEST-FAIL NAME/x: why",
# "GUEST-SKIP NAME/x: why", "GUEST-INFO NAME: ...". So an L2 failure fails
# the run. Returns 0 when L2 said GUEST-DONE without a GUEST-FAIL; otherwise
# reports "GUEST-FAIL NAME: ..." (unless L2 already failed a check), prints
# the last 40 lines of CMD's output on the console and returns 1.
run_l2() {
    l2_name=$1
    l2_limit=$2
    shift 2
    l2_log=/tmp/l2-$l2_name.log
    rm -f "$l2_log" "/tmp/.l2-$l2_name.done" "/tmp/.l2-$l2_name.failed" "/tmp/.l2-$l2_name.exit"
    l2_t0=$(cut -d' ' -f1 /proc/uptime)
    info "$l2_name: starting (limit ${l2_limit}s): $*"
    (
        timeout -s KILL "$l2_limit" "$@" 2>&1
        echo "L2-EXIT $?"
    ) | tr -d '\r' | tee "$l2_log" | while IFS= read -r l2_line; do
        case $l2_line in
        "L2-EXIT "*)
            echo "${l2_line#L2-EXIT }" >"/tmp/.l2-$l2_name.exit"
            ;;
        *GUEST-*)
            l2_marker=GUEST-${l2_line#*GUEST-}
            l2_now=$(cut -d' ' -f1 /proc/uptime)
            case $l2_marker in
            GUEST-PASS\ *) pass "$l2_name/${l2_marker#GUEST-PASS }" ;;
            GUEST-FAIL\ *)
                touch "/tmp/.l2-$l2_name.failed"
                guest_say "GUEST-FAIL $l2_name/${l2_marker#GUEST-FAIL }"
                touch /tmp/.guest-results /tmp/.guest-failed
                ;;
            GUEST-SKIP\ *) skip "$l2_name/${l2_marker#GUEST-SKIP }" ;;
            GUEST-INFO\ init-start*)
                info "$l2_name: L2 /init reached $(awk -v a="$l2_t0" -v b="$l2_now" 'BEGIN { printf "%.1f", b - a }')s after start (${l2_marker#GUEST-INFO })"
                ;;
            GUEST-INFO\ *) info "$l2_name: ${l2_marker#GUEST-INFO }" ;;
            GUEST-DONE*)
                touch "/tmp/.l2-$l2_name.done"
                info "$l2_name: L2 done $(awk -v a="$l2_t0" -v b="$l2_now" 'BEGIN { printf "%.1f", b - a }')s after start"
                ;;
            esac
            ;;
        esac
    done
    l2_exit=$(cat "/tmp/.l2-$l2_name.exit" 2>/dev/null || echo '?')
    if [ -e "/tmp/.l2-$l2_name.done" ] && [ ! -e "/tmp/.l2-$l2_name.failed" ]; then
        info "$l2_name: command exited with status $l2_exit"
        return 0
    fi
    if [ ! -e "/tmp/.l2-$l2_name.failed" ]; then
        if [ ! -e "/tmp/.l2-$l2_name.done" ]; then
            fail "$l2_name" "L2 never said GUEST-DONE (command exit status $l2_exit, limit ${l2_limit}s)"
        fi
    fi
    echo "----- last 40 lines of $l2_log -----"
    tail -n 40 "$l2_log"
    echo "----- end of $l2_log -----"
    return 1
}
