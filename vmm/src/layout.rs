//! Guest physical address map (x86_64).
//!
//! RAM starts at 0 and runs up to at most [`RAM_32BIT_END`] (3 GiB); the rest of RAM continues
//! at [`RAM_64BIT_START`] (4 GiB). Between them: the 32-bit PCI BAR window, the IOAPIC and the
//! local APICs. Low memory holds the boot structures below the kernel at 1 MiB.

/// RAM below 4 GiB ends here (3 GiB).
pub const RAM_32BIT_END: u64 = 0xC000_0000;
/// Start of the 32-bit PCI BAR window.
pub const PCI_MMIO32_START: u64 = 0xC000_0000;
/// End (exclusive) of the 32-bit PCI window (the IOAPIC follows).
pub const PCI_MMIO32_END: u64 = 0xFEC0_0000;
/// PCI ECAM (MMCONFIG) area, if used: 256 buses.
pub const PCI_MMCONFIG_START: u64 = 0xE000_0000;
/// Size of the ECAM area.
pub const PCI_MMCONFIG_SIZE: u64 = 0x1000_0000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Local APIC registers (each vCPU sees its own).
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// RAM above 3 GiB continues here.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;

/// Legacy GSI of the serial port (COM1).
pub const SERIAL_GSI: u32 = 4;
/// Legacy GSI of the ACPI SCI.
pub const SCI_GSI: u32 = 9;
/// First GSI free for MSI routes.
pub const FIRST_FREE_GSI: u32 = 24;

/// Global descriptor table used for the 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// Interrupt descriptor table (empty) used for the 64-bit entry.
pub const BOOT_IDT_START: u64 = 0x520;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Linux boot_params ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity-mapping page tables: PML4, then one PDPT, then four page directories.
pub const PML4_START: u64 = 0x9000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Maximum size of the kernel command line (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Start of the extended BIOS data area: RAM below 1 MiB ends here in the e820 map.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables (RSDP first), in the legacy BIOS area where Linux also searches for the RSDP.
pub const ACPI_START: u64 = 0xE_0000;
/// End of the legacy BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// Where the kernel is loaded (bzImage protected-mode code, or vmlinux's own addresses).
pub const KERNEL_START: u64 = 0x10_0000;
/// KVM's three-page TSS region (Intel), in the reserved range above the LAPIC.
pub const KVM_TSS_START: u64 = 0xFFFB_D000;

/// I/O port of the ACPI PM1a event block (status + enable, 4 bytes).
pub const PM1A_EVT_PORT: u16 = 0x600;
/// I/O port of the ACPI PM1a control block (2 bytes).
pub const PM1A_CNT_PORT: u16 = 0x604;
