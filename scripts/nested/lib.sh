# shellcheck shell=bash
# Nested rig: an L1 QEMU TCG guest with -cpu max (AMD SVM + nested paging),
# 2 vCPUs and 3 GiB whose /init loads irqbypass, kvm and kvm_amd, so /dev/kvm
# works in it; a payload (the vmm, daemons with their libraries, the L2 kernel
# and an L2 initramfs) and an L1 test script that decides pass/fail. Source it
# from bash (it sources scripts/guest/lib.sh):
#
#   nested_ensure                    guest_ensure + build kvm-smoke (static)
#   nested_initramfs OUT [OPTS] [-- MKINITRAMFS_ARGS...]
#       --l1-script FILE   the L1 test script (required)
#       --payload DIR      copied to /payload in L1
#       --l2-script FILE   builds an L2 initramfs with this test script into
#                          /payload/l2-initrd.gz (default modules)
#       --l2-arg ARG       extra mkinitramfs argument for the L2 initramfs
#                          (repeatable, e.g. --l2-arg -b --l2-arg ./tool)
#     Always in L1: /payload/vmlinuz (the L2 kernel, same as L1's),
#     /bin/kvm-smoke, iproute2's ip as /sbin/ip (netns, veth, tuntap), the
#     default virtio modules plus irqbypass kvm kvm_amd tun veth bridge.
#     MKINITRAMFS_ARGS go to mkinitramfs for L1 (e.g. -b target/release/vmm).
#   nested_boot NAME INITRD [guest_boot OPTS] [-- QEMU_ARGS...]
#       guest_boot with --cpu max --smp 2 --mem 3G --timeout 900 defaults.
#
# In the L1 script, run_l2 NAME SECONDS CMD... runs the vmm and relays L2's
# markers (see scripts/guest/README.md).

# shellcheck source=scripts/guest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../guest/lib.sh"
NESTED_SCRIPTS=$GUEST_REPO/scripts/nested
NESTED_BUILD=$GUEST_REPO/build/nested

nested_ensure() {
    guest_ensure || return 1
    mkdir -p "$NESTED_BUILD"
    local src=$NESTED_SCRIPTS/kvm-smoke.c bin=$NESTED_BUILD/kvm-smoke
    if [[ ! -x $bin || $src -nt $bin ]]; then
        guest_progress "building kvm-smoke (gcc -static)"
        gcc -O2 -Wall -Wextra -static -o "$bin.tmp" "$src" || return 1
        mv "$bin.tmp" "$bin"
    fi
}

nested_initramfs() {
    local out=${1:?nested_initramfs OUT ...}
    shift
    local l1_script="" payload="" l2_script="" l2_args=() rest=()
    while (($#)); do
        case $1 in
        --l1-script) l1_script=$2 && shift 2 ;;
        --payload) payload=$2 && shift 2 ;;
        --l2-script) l2_script=$2 && shift 2 ;;
        --l2-arg) l2_args+=("$2") && shift 2 ;;
        --) shift && rest=("$@") && break ;;
        *)
            guest_progress "nested_initramfs: unknown option '$1'"
            return 2
            ;;
        esac
    done
    [[ -n $l1_script ]] || {
        guest_progress "nested_initramfs: --l1-script is required"
        return 2
    }
    nested_ensure || return 1
    local args=(-s "$l1_script" --add-modules "irqbypass kvm kvm_amd tun veth bridge"
        -b "$NESTED_BUILD/kvm-smoke" -f "$GUEST_BUILD/kernel/vmlinuz:/payload/vmlinuz"
        -b "$(command -v ip):/sbin/ip")
    [[ -n $payload ]] && args+=(-d "$payload:/payload")
    if [[ -n $l2_script ]]; then
        local l2=$out.l2-initrd.gz
        guest_initramfs "$l2" -s "$l2_script" "${l2_args[@]}" || return 1
        args+=(-f "$l2:/payload/l2-initrd.gz")
    fi
    guest_initramfs "$out" "${args[@]}" "${rest[@]}"
}

nested_boot() {
    local name=${1:?nested_boot NAME INITRD ...} initrd=${2:?initrd}
    shift 2
    local opts=(--cpu max --smp 2 --mem 3G --timeout 900)
    # Caller options come after the defaults, so they win.
    guest_boot "$name" "$initrd" "${opts[@]}" "$@"
}
