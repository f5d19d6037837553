//! vCPU state for the 64-bit Linux entry: identity-mapped page tables for the first 4 GiB,
//! a flat GDT, long mode in CR0/CR4/EFER, RSI -> boot_params; plus the FPU, MSR and local
//! APIC defaults every vCPU gets.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PML4_START};
use crate::memory::GuestMemoryMmap;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// GDT selectors: null, code64, data, TSS.
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

/// Errors of vCPU setup (the KVM call and what it was for).
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT or page tables to guest memory failed.
    #[error("cannot write {0} to guest memory")]
    GuestMemory(&'static str),
    /// A KVM vCPU ioctl failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (u64::from(base & 0xff00_0000) << 32)
        | (u64::from(flags & 0xf0ff) << 40)
        | (u64::from(limit & 0x000f_0000) << 32)
        | (u64::from(base & 0x00ff_ffff) << 16)
        | u64::from(limit & 0xffff)
}

fn segment(entry: u64, selector: u16) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: (((entry >> 32) & 0xf_0000) | (entry & 0xffff)) as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Write the GDT, an empty IDT and page tables identity-mapping 0..4 GiB with 2 MiB pages.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let gdt = [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // code, 64-bit
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS (busy)
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| RegsError::GuestMemory("the GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError::GuestMemory("the IDT"))?;

    let pdpt = PML4_START + 0x1000;
    let pd = PML4_START + 0x2000;
    let pt_err = |_| RegsError::GuestMemory("the page tables");
    mem.write_obj(pdpt | 0x3, GuestAddress(PML4_START))
        .map_err(pt_err)?;
    for g in 0..4u64 {
        mem.write_obj((pd + g * 0x1000) | 0x3, GuestAddress(pdpt + g * 8))
            .map_err(pt_err)?;
    }
    for i in 0..(4 * 512u64) {
        // Present, writable, 2 MiB page.
        mem.write_obj((i << 21) | 0x83, GuestAddress(pd + i * 8))
            .map_err(pt_err)?;
    }
    Ok(())
}

/// Put `vcpu` in 64-bit mode at `entry` with RSI = `rsi` (tables from [`write_boot_tables`]).
pub fn setup_long_mode(vcpu: &VcpuFd, entry: u64, rsi: u64) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| RegsError::Kvm("KVM_GET_SREGS", e))?;
    let code = segment(gdt_entry(0xa09b, 0, 0xfffff), CODE_SELECTOR);
    let data = segment(gdt_entry(0xc093, 0, 0xfffff), DATA_SELECTOR);
    let tss = segment(gdt_entry(0x808b, 0, 0xfffff), TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("KVM_SET_SREGS", e))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| RegsError::Kvm("KVM_SET_REGS", e))
}

/// x87 and SSE control words as after FNINIT / reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| RegsError::Kvm("KVM_SET_FPU", e))
}

/// MSRs a firmware would leave initialised: SYSCALL targets cleared, fast strings on, MTRRs
/// enabled with write-back as the default type.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| {
        RegsError::Kvm(
            "building the MSR list",
            kvm_ioctls::Error::new(libc::EINVAL),
        )
    })?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Kvm("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        // Some KVMs lack an MSR (e.g. MISC_ENABLE on AMD hosts); the rest were set in order.
        log::debug!("KVM set {set} of {} boot MSRs", entries.len());
    }
    Ok(())
}

/// Local APIC: LINT0 delivers ExtINT (the PIC), LINT1 delivers NMI, as a BIOS leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_NMI: u32 = 0x4;
    const MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| RegsError::Kvm("KVM_GET_LAPIC", e))?;
    let mut set = |offset: usize, mode: u32| {
        let reg = &mut lapic.regs[offset..offset + 4];
        let bytes: [u8; 4] = [reg[0] as u8, reg[1] as u8, reg[2] as u8, reg[3] as u8];
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (dst, src) in reg.iter_mut().zip(v.to_le_bytes()) {
            *dst = src as _;
        }
    };
    set(APIC_LVT0, MODE_EXTINT);
    set(APIC_LVT1, MODE_NMI);
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let code = segment(gdt_entry(0xa09b, 0, 0xfffff), CODE_SELECTOR);
        assert_eq!(
            (code.l, code.db, code.present, code.type_, code.s),
            (1, 0, 1, 0xb, 1)
        );
        assert_eq!((code.base, code.limit, code.g), (0, 0xfffff, 1));
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), DATA_SELECTOR);
        assert_eq!((data.l, data.db, data.type_), (0, 1, 3));
    }
}
