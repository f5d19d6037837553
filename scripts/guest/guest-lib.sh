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
