//! Per-vCPU CPUID: what KVM supports, with the topology of `cpus` single-threaded cores in one
//! socket, the vCPU's APIC id, and the hypervisor bit. KVM's paravirtual leaves
//! (0x4000_0000.., kvmclock among them) are passed through as KVM reports them.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Bits needed to number `n` items.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn topology_leaf(function: u32, apic_id: u32, cpus: u32) -> [kvm_cpuid_entry2; 3] {
    let core_shift = bits_for(cpus);
    let entry = |index, eax, ebx, ecx| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic_id,
        ..Default::default()
    };
    [
        // SMT level: one thread per core.
        entry(0, 0, 1, 1 << 8),
        // Core level: all vCPUs are cores of one package.
        entry(1, core_shift, cpus, (2 << 8) | 1),
        // Terminator (level type 0).
        entry(2, 0, 0, 2),
    ]
}

/// The CPUID table for the vCPU with `apic_id` of `cpus`, derived from `supported`
/// (KVM_GET_SUPPORTED_CPUID).
pub fn vcpu_cpuid(supported: &CpuId, apic_id: u8, cpus: u8) -> CpuId {
    let apic_id = u32::from(apic_id);
    let cpus = u32::from(cpus);
    let mut entries: Vec<kvm_cpuid_entry2> = Vec::new();
    let max_basic = supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    for e in supported.as_slice() {
        let mut e = *e;
        match e.function {
            0x1 => {
                // EBX: initial APIC id, logical processors per package, CLFLUSH line (8 qwords).
                e.ebx = (apic_id << 24) | ((cpus & 0xff) << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= 1 << 31; // running under a hypervisor
                if cpus > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            0x4 => {
                // Deterministic cache parameters: cores per package, and which caches
                // are shared by all of them (level 3) or private (1, 2).
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3ff) | (sharing << 14) | ((cpus - 1) << 26);
            }
            0xb | 0x1f => continue, // rebuilt below
            0x8000_0008 => {
                // AMD: number of cores - 1 and the APIC id bits that number them.
                e.ecx = (e.ecx & !0xf0ff) | (bits_for(cpus) << 12) | (cpus - 1);
            }
            _ => {}
        }
        entries.push(e);
    }
    if max_basic >= 0xb {
        entries.extend(topology_leaf(0xb, apic_id, cpus));
    }
    if max_basic >= 0x1f {
        entries.extend(topology_leaf(0x1f, apic_id, cpus));
    }
    // Construction from a slice of valid entries cannot exceed the FAM limit: at most 6
    // entries are added to what KVM returned, and KVM's list is well below the limit.
    CpuId::from_entries(&entries).unwrap_or_else(|_| supported.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0x1f,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    #[test]
    fn apic_id_topology_and_hypervisor_bit() {
        let c = vcpu_cpuid(&base(), 3, 4);
        let find = |f: u32, i: u32| {
            *c.as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap()
        };
        let l1 = find(1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & (1 << 31), 0);
        assert_ne!(l1.edx & (1 << 28), 0);
        let core = find(0xb, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 4, 3));
        assert_eq!(find(0x1f, 0).edx, 3);
        assert_eq!((find(0xb, 2).ecx >> 8) & 0xff, 0, "terminating level");
        assert_eq!(
            c.as_slice().iter().filter(|e| e.function == 0xb).count(),
            3,
            "KVM's 0xB entries are replaced"
        );
    }

    #[test]
    fn bit_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }
}
