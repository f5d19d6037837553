# shellcheck shell=bash
# Host side of the TCG guest rigs. Source it from a bash test script:
#
#   source "$(dirname "$0")/guest/lib.sh"     # from scripts/
#   guest_ensure                              # QEMU 10, busybox, kernel
#   guest_initramfs "$dir/initrd.gz" --script my-guest-test.sh --bin ./tool
#   guest_boot mytest "$dir/initrd.gz" --mem 512M --timeout 300 -- \
#       -chardev socket,id=c0,path="$sock" -device vhost-user-blk-pci,chardev=c0
#
# Functions (all return non-zero on failure; none calls exit):
#   guest_ensure                       install QEMU 10 + tools, fetch the kernel
#   guest_initramfs OUT [ARGS...]      scripts/guest/mkinitramfs -o OUT ARGS...
#   guest_boot NAME INITRD [OPTS] [-- QEMU_ARGS...]
#                                      boot, wait for GUEST-DONE, report; 0 when
#                                      the guest reported no GUEST-FAIL, said
#                                      GUEST-DONE and QEMU exited in time
#   guest_boot_start / guest_boot_wait NAME
#                                      the same in two steps, for tests that act
#                                      on the host while the guest runs
#   guest_wait_socket PATH [SECONDS]   wait until a daemon's socket exists
#   guest_kill_all                     kill every QEMU started here (for traps)
#   guest_log NAME                     path of the guest's serial console log
#   guest_markers NAME                 path of its marker log (GUEST-* lines)
# OPTS: --mem SIZE (512M) --smp N (1) --cpu MODEL (max) --timeout SECONDS (300)
#       --append "KERNEL ARGS" --kernel BZIMAGE
# Environment: GUEST_RUN_DIR (logs; default build/guest/runs/<pid>),
#              GUEST_VERBOSE=1 echoes the console log live.

GUEST_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GUEST_SCRIPTS=$GUEST_REPO/scripts/guest
GUEST_BUILD=$GUEST_REPO/build/guest
: "${GUEST_RUN_DIR:=$GUEST_BUILD/runs/$$}"
GUEST_PIDS=()

guest_progress() { echo "[guest $(date +%H:%M:%S)] $*" >&2; }

guest_ensure() {
    "$GUEST_SCRIPTS/install-deps" || return 1
    "$GUEST_SCRIPTS/fetch-kernel" || return 1
    # Logs of old runs (default GUEST_RUN_DIR) are kept for a day.
    find "$GUEST_BUILD/runs" -mindepth 1 -maxdepth 1 -mtime +1 -exec rm -rf {} + 2>/dev/null || true
}

guest_initramfs() {
    local out=$1
    shift
    guest_progress "building initramfs $(basename "$out")"
    "$GUEST_SCRIPTS/mkinitramfs" -o "$out" "$@"
}

guest_log() { echo "$GUEST_RUN_DIR/$1/console.log"; }
guest_markers() { echo "$GUEST_RUN_DIR/$1/markers.log"; }

guest_wait_socket() {
    local path=$1 limit=${2:-30} i
    for ((i = 0; i < limit * 10; i++)); do
        [[ -S $path ]] && return 0
        sleep 0.1
    done
    guest_progress "socket $path did not appear within ${limit}s"
    return 1
}

guest_boot_start() {
    local name=${1:?guest_boot_start NAME INITRD ...} initrd=${2:?initrd}
    shift 2
    local mem=512M smp=1 cpu=max timeout=300 append="" kernel=$GUEST_BUILD/kernel/vmlinuz
    while (($#)); do
        case $1 in
        --mem) mem=$2 && shift 2 ;;
        --smp) smp=$2 && shift 2 ;;
        --cpu) cpu=$2 && shift 2 ;;
        --timeout) timeout=$2 && shift 2 ;;
        --append) append=$2 && shift 2 ;;
        --kernel) kernel=$2 && shift 2 ;;
        --) shift && break ;;
        *)
            guest_progress "guest_boot: unknown option '$1'"
            return 2
            ;;
        esac
    done
    [[ -f $kernel ]] || {
        guest_progress "kernel $kernel missing (call guest_ensure)"
        return 1
    }
    [[ -f $initrd ]] || {
        guest_progress "initramfs $initrd missing"
        return 1
    }
    local dir=$GUEST_RUN_DIR/$name
    rm -rf "$dir"
    mkdir -p "$dir"
    : >"$dir/console.log"
    : >"$dir/markers.log"
    local cmd=(
        qemu-system-x86_64 -accel tcg -M pc -cpu "$cpu" -smp "$smp" -m "$mem"
        -object "memory-backend-memfd,id=mem,size=$mem,share=on" -numa "node,memdev=mem"
        -nodefaults -display none -vga none -monitor none -no-reboot
        -serial "file:$dir/console.log" -serial "file:$dir/markers.log"
        -kernel "$kernel" -initrd "$initrd"
        -append "console=ttyS0 panic=-1 quiet guest.markers=/dev/ttyS1 $append"
        "$@"
    )
    printf '%q ' "${cmd[@]}" >"$dir/cmdline"
    echo "$timeout" >"$dir/timeout"
    date +%s.%N >"$dir/start"
    # `timeout` bounds QEMU even if this script dies before guest_boot_wait.
    timeout --kill-after=10 "$timeout" "${cmd[@]}" </dev/null >"$dir/qemu.out" 2>&1 &
    echo $! >"$dir/pid"
    GUEST_PIDS+=($!)
    guest_progress "booting $name (TCG, $mem, $smp vCPU, timeout ${timeout}s; logs in $dir)"
}

guest_kill_all() {
    local pid
    for pid in "${GUEST_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
}

# Seconds elapsed since a start stamp, one decimal.
guest_elapsed() { awk -v s="$1" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }'; }

guest_boot_wait() {
    local name=${1:?guest_boot_wait NAME}
    local dir=$GUEST_RUN_DIR/$name
    local pid start timeout
    pid=$(cat "$dir/pid")
    start=$(cat "$dir/start")
    timeout=$(cat "$dir/timeout")
    local shown=0 init_at="" done_at="" last_progress=0 now lines elapsed rc=0
    local console_shown=0
    while :; do
        # Relay new marker lines as they arrive.
        lines=$(tr -d '\r' <"$dir/markers.log" | grep -a '^GUEST-' || true)
        if [[ -n $lines ]]; then
            local count
            count=$(wc -l <<<"$lines")
            if ((count > shown)); then
                tail -n +$((shown + 1)) <<<"$lines" | sed "s/^/[guest $name] /" >&2
                shown=$count
            fi
            if [[ -z $init_at ]] && grep -q '^GUEST-INFO init-start' <<<"$lines"; then
                init_at=$(guest_elapsed "$start")
            fi
            if [[ -z $done_at ]] && grep -q '^GUEST-DONE' <<<"$lines"; then
                done_at=$(guest_elapsed "$start")
            fi
        fi
        if [[ ${GUEST_VERBOSE:-0} == 1 ]]; then
            local clines
            clines=$(wc -l <"$dir/console.log")
            if ((clines > console_shown)); then
                sed -n "$((console_shown + 1)),${clines}p" "$dir/console.log" | tr -d '\r' | sed "s/^/[console $name] /" >&2
                console_shown=$clines
            fi
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
        now=${SECONDS}
        if ((now - last_progress >= 15)); then
            if ((last_progress > 0)); then
                elapsed=$(guest_elapsed "$start")
                guest_progress "$name still running after ${elapsed}s (limit ${timeout}s); console: $(tr -d '\r' <"$dir/console.log" | grep -v '^$' | tail -n1 | cut -c1-100)"
            fi
            last_progress=$now
        fi
        sleep 0.2
    done
    wait "$pid" 2>/dev/null || rc=$?
    elapsed=$(guest_elapsed "$start")

    local markers passes fails skips
    markers=$(tr -d '\r' <"$dir/markers.log" | grep -a '^GUEST-' || true)
    passes=$(grep -c '^GUEST-PASS' <<<"$markers" || true)
    fails=$(grep -c '^GUEST-FAIL' <<<"$markers" || true)
    skips=$(grep -c '^GUEST-SKIP' <<<"$markers" || true)
    local problem=""
    if ((rc == 124 || rc == 137)); then
        problem="timed out after ${timeout}s"
    elif [[ -z $done_at ]]; then
        problem="QEMU exited (status $rc) before GUEST-DONE"
        grep -aq 'Kernel panic' "$dir/console.log" && problem+=" (kernel panic)"
    elif ((rc != 0)); then
        problem="QEMU exited with status $rc"
    elif ((fails > 0)); then
        problem="$fails check(s) failed"
    fi
    local summary="$name: $passes passed, $fails failed, $skips skipped; /init at ${init_at:-?}s, done at ${done_at:-?}s, QEMU exit at ${elapsed}s"
    if [[ -n $problem ]]; then
        guest_progress "FAIL $summary: $problem"
        echo "----- last 60 console lines of $name ($dir/console.log) -----" >&2
        tr -d '\r' <"$dir/console.log" | tail -n 60 >&2
        if [[ -s $dir/qemu.out ]]; then
            echo "----- QEMU output -----" >&2
            tail -n 20 "$dir/qemu.out" >&2
        fi
        echo "----- end of $name logs -----" >&2
        return 1
    fi
    guest_progress "PASS $summary"
    return 0
}

guest_boot() {
    guest_boot_start "$@" || return 1
    guest_boot_wait "$1"
}
