//! Loading a Linux kernel and building everything it reads at its 64-bit entry point:
//! the zero page (boot_params with the e820 map), the command line, the initramfs, the ACPI
//! tables, and per vCPU the CPUID table, registers, page tables and local APIC.

pub mod acpi;
pub mod cpuid;
pub mod regs;
mod sendfile;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::layout::*;
use crate::memory::GuestMemoryMmap;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved ranges.
pub const E820_RESERVED: u32 = 2;

/// Errors loading the kernel and boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("cannot read kernel {0}: {1}")]
    KernelFile(PathBuf, #[source] std::io::Error),
    /// The kernel is neither a valid bzImage nor a valid ELF vmlinux.
    #[error("cannot load kernel {0}: {1}")]
    KernelLoad(PathBuf, String),
    /// The initramfs could not be read.
    #[error("cannot read initramfs {0}: {1}")]
    Initramfs(PathBuf, #[source] std::io::Error),
    /// The initramfs does not fit in RAM below the kernel's limit.
    #[error("initramfs {0} ({1} bytes) does not fit in guest RAM below {2:#x} after the kernel")]
    InitramfsTooLarge(PathBuf, u64, u64),
    /// The command line is longer than the kernel accepts, or contains a NUL.
    #[error("kernel command line ({0} bytes) is longer than the kernel's limit of {1} bytes or contains a NUL")]
    Cmdline(usize, u32),
    /// Writing boot data to guest memory failed (RAM too small).
    #[error("guest RAM is too small for the boot data at {0:#x}")]
    GuestMemory(u64),
    /// Configuring a vCPU failed.
    #[error("cannot set up vCPU {0}: {1}")]
    Vcpu(u8, String),
}

/// What a vCPU needs to start the loaded kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// 64-bit entry point.
    pub entry: u64,
    /// Address of boot_params, passed in RSI.
    pub zero_page: u64,
}

/// The e820 map for `ram` (start, length) ranges as laid out by [`crate::memory::ram_ranges`].
pub fn e820_map(ram: &[(u64, u64)]) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let low_end = ram.first().map_or(0, |r| r.0 + r.1);
    let mut map = vec![
        entry(0, EBDA_START.min(low_end), E820_RAM),
        entry(EBDA_START, 0xA_0000 - EBDA_START, E820_RESERVED),
        entry(ACPI_START, BIOS_END - ACPI_START, E820_RESERVED),
    ];
    if low_end > BIOS_END {
        map.push(entry(BIOS_END, low_end - BIOS_END, E820_RAM));
    }
    // IOAPIC, local APICs and KVM's TSS pages; the PCI window below stays a hole.
    map.push(entry(
        IOAPIC_START,
        RAM_64BIT_START - IOAPIC_START,
        E820_RESERVED,
    ));
    for &(start, len) in ram.iter().skip(1) {
        map.push(entry(start, len, E820_RAM));
    }
    map
}

fn guest_write(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|_| BootError::GuestMemory(addr))
}

fn is_elf(file: &mut File) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0))?;
    let n = file.read(&mut magic)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(n == 4 && magic == *b"\x7fELF")
}

/// Load the kernel, initramfs and command line, write the zero page and ACPI tables.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    ram: &[(u64, u64)],
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    hotplug: &crate::hotplug::HotplugLayout,
) -> Result<BootEntry, BootError> {
    let mut file = File::open(kernel).map_err(|e| BootError::KernelFile(kernel.into(), e))?;
    let elf = is_elf(&mut file).map_err(|e| BootError::KernelFile(kernel.into(), e))?;
    let load_err =
        |e: linux_loader::loader::Error| BootError::KernelLoad(kernel.into(), e.to_string());
    let (entry, kernel_end, mut hdr) = if elf {
        let mut source = sendfile::SendfileSource::new(&mut file, mem);
        let r = Elf::load(mem, None, &mut source, Some(GuestAddress(KERNEL_START)))
            .map_err(load_err)?;
        let hdr = setup_header {
            boot_flag: 0xaa55,
            header: 0x5372_6448, // "HdrS"
            kernel_alignment: 0x100_0000,
            cmdline_size: CMDLINE_MAX_SIZE as u32 - 1,
            initrd_addr_max: (RAM_32BIT_END - 1) as u32,
            ..Default::default()
        };
        (r.kernel_load.raw_value(), r.kernel_end, hdr)
    } else {
        let mut source = sendfile::SendfileSource::new(&mut file, mem);
        let r = BzImage::load(mem, None, &mut source, Some(GuestAddress(KERNEL_START)))
            .map_err(load_err)?;
        let hdr = r
            .setup_header
            .ok_or_else(|| BootError::KernelLoad(kernel.into(), "no setup header".into()))?;
        // The 64-bit entry point is 0x200 bytes into the protected-mode code.
        (r.kernel_load.raw_value() + 0x200, r.kernel_end, hdr)
    };

    // Boot protocol 2.06+ gives the limit; older kernels take 255 bytes.
    let cmdline_limit = if hdr.version >= 0x206 && hdr.cmdline_size > 0 {
        hdr.cmdline_size
    } else {
        255
    };
    if cmdline.len() > cmdline_limit as usize
        || cmdline.len() >= CMDLINE_MAX_SIZE
        || cmdline.contains('\0')
    {
        return Err(BootError::Cmdline(cmdline.len(), cmdline_limit));
    }
    let mut cmdline_bytes = cmdline.as_bytes().to_vec();
    cmdline_bytes.push(0);
    guest_write(mem, CMDLINE_START, &cmdline_bytes)?;

    hdr.type_of_loader = 0xff;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline.len() as u32;
    if let Some(path) = initramfs {
        let (addr, size) = load_initramfs(mem, ram, path, kernel_end, hdr.initrd_addr_max)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    let rsdp = acpi::create_acpi_tables(mem, hotplug)?;
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    let map = e820_map(ram);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::GuestMemory(ZERO_PAGE_START))?;
    Ok(BootEntry {
        entry,
        zero_page: ZERO_PAGE_START,
    })
}

/// Put the initramfs as high as possible in low RAM below the kernel's `initrd_addr_max`.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    ram: &[(u64, u64)],
    path: &Path,
    kernel_end: u64,
    initrd_addr_max: u32,
) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(|e| BootError::Initramfs(path.into(), e))?;
    let size = file
        .metadata()
        .map_err(|e| BootError::Initramfs(path.into(), e))?
        .len();
    let low_end = ram.first().map_or(0, |r| r.0 + r.1);
    let limit = low_end.min(u64::from(initrd_addr_max) + 1);
    let too_large = || BootError::InitramfsTooLarge(path.into(), size, limit);
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end || addr < BIOS_END || size > u64::from(u32::MAX) {
        return Err(too_large());
    }
    let mut source = sendfile::SendfileSource::new(&mut file, mem);
    mem.read_exact_volatile_from(GuestAddress(addr), &mut source, size as usize)
        .map_err(|e| BootError::Initramfs(path.into(), std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ram_ranges;

    #[test]
    fn e820_leaves_the_pci_hole_and_reserves_the_apics() {
        let map = e820_map(&ram_ranges(4 << 30));
        let ram: Vec<(u64, u64)> = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| (e.addr, e.size))
            .collect();
        assert_eq!(
            ram,
            vec![
                (0, EBDA_START),
                (BIOS_END, RAM_32BIT_END - BIOS_END),
                (RAM_64BIT_START, 1 << 30)
            ]
        );
        assert_eq!(
            ram.iter().map(|r| r.1).sum::<u64>() + (BIOS_END - EBDA_START),
            4 << 30
        );
        for addr in [IOAPIC_START, LAPIC_START, KVM_TSS_START, ACPI_START] {
            assert!(map
                .iter()
                .any(|e| e.r#type == E820_RESERVED && (e.addr..e.addr + e.size).contains(&addr)));
        }
        assert!(!map
            .iter()
            .any(|e| (e.addr..e.addr + e.size).contains(&PCI_MMIO32_START)));
    }
}
