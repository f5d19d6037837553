//! ACPI tables: RSDP -> XSDT -> FADT (-> FACS, DSDT) and MADT.
//!
//! The MADT enumerates the vCPUs (one local APIC each) and the IOAPIC. The DSDT describes the
//! PCI host bridge (so Linux scans bus 0 through ports 0xCF8/0xCFC and accepts the BAR window)
//! and the `_S5` sleep type. The FADT points at the PM1 registers of
//! [`crate::devices::legacy::AcpiPm`], through which Linux's `poweroff` reaches the VMM, and at
//! the i8042 port as the reset register. With hot-plug ([`HotplugLayout`]) the MADT lists
//! every possible vCPU (those not there at boot "online capable") and the DSDT gets the
//! processor, memory and event devices of [`crate::hotplug`].

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::devices::legacy::pm::{PM1_CNT_LEN, PM1_EVT_LEN, S5_SLEEP_TYPE};
use crate::hotplug::HotplugLayout;
use crate::layout::*;
use crate::memory::GuestMemoryMmap;

const OEM_ID: &[u8; 6] = b"LEANVM";
const OEM_TABLE_ID: &[u8; 8] = b"LEANVMM ";
const CREATOR_ID: &[u8; 4] = b"LVMM";

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table being built: header first, body appended.
struct Sdt(Vec<u8>);

impl Sdt {
    fn new(signature: &[u8; 4], revision: u8) -> Self {
        let mut b = Vec::with_capacity(256);
        b.extend_from_slice(signature);
        b.extend_from_slice(&0u32.to_le_bytes()); // length, fixed up in finish()
        b.push(revision);
        b.push(0); // checksum
        b.extend_from_slice(OEM_ID);
        b.extend_from_slice(OEM_TABLE_ID);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(CREATOR_ID);
        b.extend_from_slice(&1u32.to_le_bytes());
        Self(b)
    }

    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// Generic address structure for an I/O port register.
    fn gas_io(&mut self, port: u16, bytes: u8) -> &mut Self {
        let access = match bytes {
            1 => 1,
            2 => 2,
            _ => 3,
        };
        self.u8(1)
            .u8(bytes * 8)
            .u8(0)
            .u8(access)
            .u64(u64::from(port))
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

/// AML encoding of the few objects the DSDT needs.
mod aml {
    pub const ZERO: u8 = 0x00;
    const NAME_OP: u8 = 0x08;
    const BYTE_PREFIX: u8 = 0x0a;
    const WORD_PREFIX: u8 = 0x0b;
    const DWORD_PREFIX: u8 = 0x0c;
    const SCOPE_OP: u8 = 0x10;
    const BUFFER_OP: u8 = 0x11;
    const PACKAGE_OP: u8 = 0x12;
    const EXT_OP: u8 = 0x5b;
    const DEVICE_OP: u8 = 0x82;

    /// PkgLength: the length of what follows plus the encoding itself.
    pub fn pkg_length(content: usize) -> Vec<u8> {
        if content + 1 < 0x40 {
            vec![(content + 1) as u8]
        } else if content + 2 < 0x1000 {
            let l = content + 2;
            vec![0x40 | (l & 0xf) as u8, (l >> 4) as u8]
        } else {
            let l = content + 3;
            vec![0x80 | (l & 0xf) as u8, (l >> 4) as u8, (l >> 12) as u8]
        }
    }

    pub fn integer(v: u32) -> Vec<u8> {
        match v {
            0..=0xff => vec![BYTE_PREFIX, v as u8],
            0x100..=0xffff => {
                let mut b = vec![WORD_PREFIX];
                b.extend_from_slice(&(v as u16).to_le_bytes());
                b
            }
            _ => {
                let mut b = vec![DWORD_PREFIX];
                b.extend_from_slice(&v.to_le_bytes());
                b
            }
        }
    }

    pub fn name(seg: &[u8; 4], value: Vec<u8>) -> Vec<u8> {
        let mut b = vec![NAME_OP];
        b.extend_from_slice(seg);
        b.extend(value);
        b
    }

    fn with_pkg(op: &[u8], head: &[u8], body: &[u8]) -> Vec<u8> {
        let mut b = op.to_vec();
        b.extend(pkg_length(head.len() + body.len()));
        b.extend_from_slice(head);
        b.extend_from_slice(body);
        b
    }

    pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = elements.concat();
        with_pkg(&[PACKAGE_OP], &[elements.len() as u8], &body)
    }

    pub fn buffer(data: &[u8]) -> Vec<u8> {
        with_pkg(&[BUFFER_OP], &integer(data.len() as u32), data)
    }

    pub fn scope(path: &[u8], body: &[u8]) -> Vec<u8> {
        with_pkg(&[SCOPE_OP], path, body)
    }

    pub fn device(seg: &[u8; 4], body: &[u8]) -> Vec<u8> {
        with_pkg(&[EXT_OP, DEVICE_OP], seg, body)
    }

    /// Compressed EISA id ("PNP0A03" -> 0x030AD041).
    pub fn eisa_id(id: &[u8; 7]) -> u32 {
        let c = |i: usize| u32::from(id[i] - 0x40) & 0x1f;
        let hex = |i: usize| u32::from((id[i] as char).to_digit(16).unwrap_or(0) as u8);
        let mfg = (c(0) << 10) | (c(1) << 5) | c(2);
        let product = (hex(3) << 12) | (hex(4) << 8) | (hex(5) << 4) | hex(6);
        let be = (mfg << 16) | product;
        be.swap_bytes()
    }

    /// Word address space descriptor (bus number or I/O range), producer, fixed min/max.
    pub fn word_range(kind: u8, type_flags: u8, min: u16, max: u16) -> Vec<u8> {
        let mut b = vec![0x88, 0x0d, 0x00, kind, 0x0c, type_flags];
        for v in [0u16, min, max, 0, max - min + 1] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// DWord memory range descriptor, producer, fixed min/max, read-write, non-cacheable.
    pub fn dword_memory(min: u32, max: u32) -> Vec<u8> {
        let mut b = vec![0x87, 0x17, 0x00, 0x00, 0x0c, 0x01];
        for v in [0u32, min, max, 0, max - min + 1] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Fixed 16-bit decoded I/O ports.
    pub fn io(base: u16, len: u8) -> Vec<u8> {
        let mut b = vec![0x47, 0x01];
        b.extend_from_slice(&base.to_le_bytes());
        b.extend_from_slice(&base.to_le_bytes());
        b.push(1);
        b.push(len);
        b
    }

    pub const END_TAG: [u8; 2] = [0x79, 0x00];
}

fn dsdt(hotplug: &HotplugLayout) -> Vec<u8> {
    let mut crs = Vec::new();
    crs.extend(aml::word_range(2, 0, 0, 0)); // bus 0
    crs.extend(aml::io(0xcf8, 8));
    crs.extend(aml::word_range(1, 3, 0x0000, 0x0cf7));
    crs.extend(aml::word_range(1, 3, 0x0d00, 0xffff));
    crs.extend(aml::dword_memory(
        PCI_MMIO32_START as u32,
        (PCI_MMCONFIG_START - 1) as u32,
    ));
    crs.extend_from_slice(&aml::END_TAG);

    let mut pci0 = Vec::new();
    pci0.extend(aml::name(b"_HID", aml::integer(aml::eisa_id(b"PNP0A03"))));
    pci0.extend(aml::name(b"_ADR", vec![aml::ZERO]));
    pci0.extend(aml::name(b"_UID", vec![aml::ZERO]));
    pci0.extend(aml::name(b"_BBN", vec![aml::ZERO]));
    pci0.extend(aml::name(b"_CRS", aml::buffer(&crs)));
    let mut sb_body = aml::device(b"PCI0", &pci0);
    sb_body.extend(hotplug.aml());
    let sb = aml::scope(b"\\_SB_", &sb_body);

    let s5 = aml::name(
        b"_S5_",
        aml::package(&[
            aml::integer(u32::from(S5_SLEEP_TYPE)),
            aml::integer(u32::from(S5_SLEEP_TYPE)),
            vec![aml::ZERO],
            vec![aml::ZERO],
        ]),
    );
    let mut t = Sdt::new(b"DSDT", 2);
    t.bytes(&sb).bytes(&s5);
    t.finish()
}

fn facs() -> Vec<u8> {
    let mut b = vec![0u8; 64];
    b[0..4].copy_from_slice(b"FACS");
    b[4..8].copy_from_slice(&64u32.to_le_bytes());
    b[32] = 2; // version
    b
}

fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    const WBINVD: u32 = 1 << 0;
    const PWR_BUTTON: u32 = 1 << 4;
    const SLP_BUTTON: u32 = 1 << 5;
    const RESET_REG_SUP: u32 = 1 << 10;
    const BOOT_LEGACY_DEVICES: u16 = 1 << 0;
    const BOOT_8042: u16 = 1 << 1;
    let mut t = Sdt::new(b"FACP", 6);
    // The FACS is given once, in X_FIRMWARE_CTRL (both fields set make Linux map it twice).
    t.u32(0)
        .u32(dsdt as u32)
        .u8(0)
        .u8(0) // preferred PM profile: unspecified
        .u16(SCI_GSI as u16)
        .u32(0) // SMI_CMD: no SMM, ACPI mode is always on
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0)
        .u32(u32::from(PM1A_EVT_PORT))
        .u32(0)
        .u32(u32::from(PM1A_CNT_PORT))
        .u32(0)
        .u32(0) // PM2
        .u32(0) // PM timer
        .u32(0) // GPE0
        .u32(0) // GPE1
        .u8(PM1_EVT_LEN)
        .u8(PM1_CNT_LEN)
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0)
        .u16(101) // C2 latency > 100: C2 unsupported
        .u16(1001) // C3 latency > 1000: C3 unsupported
        .u16(0)
        .u16(0)
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0x32) // CMOS century register
        .u16(BOOT_LEGACY_DEVICES | BOOT_8042)
        .u8(0)
        .u32(WBINVD | PWR_BUTTON | SLP_BUTTON | RESET_REG_SUP)
        .gas_io(0x64, 1) // reset register: i8042 command port ...
        .u8(0xfe) // ... pulse reset
        .u16(0)
        .u8(0) // FADT minor version
        .u64(facs)
        .u64(dsdt);
    // X_PM1a/b_EVT, X_PM1a/b_CNT, X_PM2, X_PM_TMR, X_GPE0/1, sleep control/status: the 32-bit
    // fields above are used.
    t.bytes(&[0u8; 12 * 10]).u64(0); // hypervisor vendor identity
    t.finish()
}

fn madt(cpus: u8, max_cpus: u8) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    const ENABLED: u32 = 1;
    const ONLINE_CAPABLE: u32 = 2;
    let mut t = Sdt::new(b"APIC", 5);
    t.u32(LAPIC_START as u32).u32(PCAT_COMPAT);
    for id in 0..cpus.max(max_cpus) {
        let flags = if id < cpus { ENABLED } else { ONLINE_CAPABLE };
        t.u8(0).u8(8).u8(id).u8(id).u32(flags);
    }
    t.u8(1).u8(12).u8(0).u8(0).u32(IOAPIC_START as u32).u32(0);
    // The SCI is level-triggered, active high.
    t.u8(2)
        .u8(10)
        .u8(0)
        .u8(SCI_GSI as u8)
        .u32(SCI_GSI)
        .u16(0x000d);
    // LINT1 of every processor is the NMI input.
    t.u8(4).u8(6).u8(0xff).u16(0).u8(1);
    t.finish()
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(36);
    b.extend_from_slice(b"RSD PTR ");
    b.push(0);
    b.extend_from_slice(OEM_ID);
    b.push(2);
    b.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    b.extend_from_slice(&36u32.to_le_bytes());
    b.extend_from_slice(&xsdt.to_le_bytes());
    b.extend_from_slice(&[0, 0, 0, 0]);
    b[8] = checksum(&b[..20]);
    b[32] = checksum(&b);
    b
}

/// Write all tables at [`ACPI_START`]; returns the RSDP address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    hotplug: &HotplugLayout,
) -> Result<u64, BootError> {
    let mut next = ACPI_START + 64; // the RSDP goes first, at a 16-byte boundary
    let mut place = |bytes: &[u8]| -> Result<u64, BootError> {
        let addr = next;
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|_| BootError::GuestMemory(addr))?;
        next = (addr + bytes.len() as u64 + 63) & !63;
        Ok(addr)
    };
    let facs = place(&facs())?;
    let dsdt = place(&dsdt(hotplug))?;
    let fadt = place(&fadt(facs, dsdt))?;
    let madt = place(&madt(hotplug.boot_cpus, hotplug.max_cpus))?;
    let mut xsdt = Sdt::new(b"XSDT", 1);
    xsdt.u64(fadt).u64(madt);
    let xsdt = place(&xsdt.finish())?;
    if next > BIOS_END {
        return Err(BootError::GuestMemory(next));
    }
    mem.write_slice(&rsdp(xsdt), GuestAddress(ACPI_START))
        .map_err(|_| BootError::GuestMemory(ACPI_START))?;
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        let hotplug = HotplugLayout {
            boot_cpus: 2,
            max_cpus: 4,
            mem_blocks: vec![(4 << 30, 128 << 20)],
        };
        let none = HotplugLayout {
            boot_cpus: 4,
            max_cpus: 4,
            mem_blocks: vec![],
        };
        for t in [
            dsdt(&none),
            dsdt(&hotplug),
            fadt(0x1000, 0x2000),
            madt(4, 4),
            madt(2, 4),
        ] {
            assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
        }
        assert_eq!(fadt(0, 0).len(), 276, "ACPI 6 FADT size");
        assert_eq!(madt(2, 2).len(), 44 + 2 * 8 + 12 + 10 + 6);
        let m = madt(2, 3);
        assert_eq!(m.len(), 44 + 3 * 8 + 12 + 10 + 6);
        assert_eq!(
            &m[44 + 8..44 + 24],
            &[0, 8, 1, 1, 1, 0, 0, 0, 0, 8, 2, 2, 2, 0, 0, 0]
        );
        assert!(dsdt(&hotplug).len() > dsdt(&none).len() + 200);
        let r = rsdp(0x1234);
        assert_eq!(r[..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(r.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn aml_encodings() {
        assert_eq!(aml::eisa_id(b"PNP0A03"), 0x030A_D041);
        assert_eq!(aml::pkg_length(10), vec![11]);
        assert_eq!(aml::pkg_length(0x3e), vec![0x3f]);
        assert_eq!(aml::pkg_length(0x3f), vec![0x41, 0x04]);
        assert_eq!(aml::pkg_length(0x200), vec![0x42, 0x20]);
        assert_eq!(aml::integer(5), vec![0x0a, 5]);
        assert_eq!(aml::integer(0x1234), vec![0x0b, 0x34, 0x12]);
    }
}
