//! ACPI hot-plug of vCPUs and RAM, the way a stock Linux guest accepts it.
//!
//! The guest sees, in the DSDT:
//! - an ACPI0007 processor device per possible vCPU (`max_cpus`), whose `_STA` reads that
//!   vCPU's byte of the hot-plug controller (I/O ports [`CPU_PORT`] + id) and whose `_EJ0`
//!   writes "eject" to it; the MADT lists the vCPUs not present at boot as "online capable";
//! - a PNP0C80 memory device per hot-pluggable RAM block (ports [`MEM_PORT`] + block), with
//!   its range in `_CRS`;
//! - a Generic Event Device (ACPI0013) on GSI [`GED_GSI`] whose `_EVT` looks at every byte
//!   and notifies the devices being added (Notify 1) or asked to leave (Notify 3).
//!
//! The VMM changes a byte ([`HotplugController`]) and pulses the GED interrupt; the guest does
//! the rest on its own time: Linux adds a CPU (udev or the user onlines it), or offlines one and
//! calls `_EJ0`, or adds the memory blocks (offline until onlined).

use std::sync::{Arc, Mutex};

use acpi_tables::aml;
use acpi_tables::{Aml, AmlSink};

use crate::bus::BusDevice;
use crate::config::{VmConfig, HOTPLUG_GRANULE};
use crate::layout::RAM_64BIT_START;

/// First I/O port of the vCPU hot-plug bytes (one per possible vCPU).
pub const CPU_PORT: u16 = 0xa00;
/// First I/O port of the RAM hot-plug bytes (one per block).
pub const MEM_PORT: u16 = 0xb00;
/// GSI of the Generic Event Device (edge, active high).
pub const GED_GSI: u32 = 5;
/// Most RAM blocks the room above boot RAM is split into.
pub const MAX_MEM_BLOCKS: u64 = 16;

/// Status byte bits. Read: `PRESENT`, and a pending `INSERT` or `REMOVE` notification; the
/// guest writes `INSERT`/`REMOVE` back to acknowledge them, and `EJECT` from `_EJ0`.
pub const PRESENT: u8 = 1;
/// The device was added and the guest not yet notified.
pub const INSERT: u8 = 2;
/// The guest is asked to give the device back.
pub const REMOVE: u8 = 4;
/// Written by `_EJ0`: the guest has let go of the device.
pub const EJECT: u8 = 8;

/// What can be hot-plugged into a VM, fixed at boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HotplugLayout {
    /// vCPUs at boot.
    pub boot_cpus: u8,
    /// Possible vCPUs.
    pub max_cpus: u8,
    /// (guest address, size) of each hot-pluggable RAM block.
    pub mem_blocks: Vec<(u64, u64)>,
}

/// Where RAM of `memory` bytes ends in guest physical space (see [`crate::memory::ram_ranges`]).
fn ram_end(memory: u64) -> u64 {
    crate::memory::ram_ranges(memory)
        .last()
        .map_or(0, |&(start, len)| start + len)
}

impl HotplugLayout {
    /// The layout `config` asks for: `max_cpus` possible vCPUs, and the room between `memory`
    /// and `max_memory` in at most [`MAX_MEM_BLOCKS`] equal blocks (multiples of 128 MiB),
    /// above 4 GiB and above all boot RAM, 1 GiB aligned.
    pub fn new(config: &VmConfig) -> Self {
        let room = config.max_ram() - config.memory;
        let granules = room / HOTPLUG_GRANULE;
        let blocks = (1..=MAX_MEM_BLOCKS.min(granules))
            .rev()
            .find(|n| granules.is_multiple_of(*n))
            .unwrap_or(0);
        let mut mem_blocks = Vec::new();
        if let Some(size) = (granules * HOTPLUG_GRANULE).checked_div(blocks) {
            let base = ram_end(config.memory)
                .max(RAM_64BIT_START)
                .next_multiple_of(1 << 30);
            for i in 0..blocks {
                mem_blocks.push((base + i * size, size));
            }
        }
        Self {
            boot_cpus: config.cpus,
            max_cpus: config.max_vcpus(),
            mem_blocks,
        }
    }

    /// Whether anything can be hot-plugged (otherwise the guest sees no trace of it).
    pub fn enabled(&self) -> bool {
        self.max_cpus > self.boot_cpus || !self.mem_blocks.is_empty()
    }

    /// Size of one RAM block (0 without RAM hot-plug).
    pub fn block_size(&self) -> u64 {
        self.mem_blocks.first().map_or(0, |b| b.1)
    }

    /// The DSDT objects, for `\_SB_`: GED, processor and memory devices (empty when
    /// nothing can be hot-plugged).
    pub fn aml(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.enabled() {
            return out;
        }
        for id in 0..self.max_cpus {
            cpu_device(id).to_aml_bytes(&mut out);
        }
        for (i, &(base, size)) in self.mem_blocks.iter().enumerate() {
            memory_device(i as u8, base, size).to_aml_bytes(&mut out);
        }
        self.ged().to_aml_bytes(&mut out);
        out
    }

    fn ged(&self) -> GedAml {
        GedAml {
            cpus: self.max_cpus,
            blocks: self.mem_blocks.len() as u8,
        }
    }
}

fn cpu_name(id: u8) -> String {
    format!("C{id:03X}")
}

fn mem_name(block: u8) -> String {
    format!("M{block:03X}")
}

/// `Device (Cnnn)`: an ACPI0007 processor whose presence is its controller byte.
struct CpuDevice {
    id: u8,
}

fn cpu_device(id: u8) -> CpuDevice {
    CpuDevice { id }
}

/// `Method (_STA) { If (And (STAT, PRESENT)) { Return (0xF) } Return (Zero) }`
fn sta_method(sink: &mut dyn AmlSink, field: &str) {
    let field = aml::Path::new(field);
    let present = aml::And::new(&aml::ZERO, &field, &PRESENT);
    let ret_f = aml::Return::new(&0xfu8);
    let ret_0 = aml::Return::new(&aml::ZERO);
    aml::Method::new(
        "_STA".into(),
        0,
        false,
        vec![&aml::If::new(&present, vec![&ret_f]), &ret_0],
    )
    .to_aml_bytes(sink);
}

/// `OperationRegion (REG, SystemIO, port, 1)` and `Field (REG, ByteAcc) { FIELD, 8 }`.
fn status_byte(sink: &mut dyn AmlSink, region: &str, field: [u8; 4], port: u16) {
    let port = u32::from(port);
    aml::OpRegion::new(region.into(), aml::OpRegionSpace::SystemIO, &port, &1u8).to_aml_bytes(sink);
    aml::Field::new(
        region.into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(field, 8)],
    )
    .to_aml_bytes(sink);
}

impl Aml for CpuDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let id = self.id;
        let mut body = Vec::new();
        aml::Name::new("_HID".into(), &"ACPI0007").to_aml_bytes(&mut body);
        aml::Name::new("_UID".into(), &id).to_aml_bytes(&mut body);
        status_byte(&mut body, "CREG", *b"CSTA", CPU_PORT + u16::from(id));
        sta_method(&mut body, "CSTA");
        // The MADT entry Linux maps a hot-added processor with (type 0, enabled).
        let mat = aml::BufferData::new(vec![0, 8, id, id, 1, 0, 0, 0]);
        aml::Name::new("_MAT".into(), &mat).to_aml_bytes(&mut body);
        let csta = aml::Path::new("CSTA");
        let eject = aml::Store::new(&csta, &EJECT);
        aml::Method::new("_EJ0".into(), 1, false, vec![&eject]).to_aml_bytes(&mut body);
        device(sink, &cpu_name(id), body);
    }
}

/// `Device (Mnnn)`: a PNP0C80 memory device for one RAM block.
struct MemoryDevice {
    block: u8,
    base: u64,
    size: u64,
}

fn memory_device(block: u8, base: u64, size: u64) -> MemoryDevice {
    MemoryDevice { block, base, size }
}

impl Aml for MemoryDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let mut body = Vec::new();
        aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C80")).to_aml_bytes(&mut body);
        aml::Name::new("_UID".into(), &self.block).to_aml_bytes(&mut body);
        status_byte(
            &mut body,
            "MREG",
            *b"MSTA",
            MEM_PORT + u16::from(self.block),
        );
        sta_method(&mut body, "MSTA");
        let range = aml::AddressSpace::<u64>::new_memory(
            aml::AddressSpaceCacheable::Cacheable,
            true,
            self.base,
            self.base + self.size - 1,
            None,
        );
        aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&range]))
            .to_aml_bytes(&mut body);
        device(sink, &mem_name(self.block), body);
    }
}

/// AML already encoded.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// `Device (NAME) { body }` with an already encoded body.
fn device(sink: &mut dyn AmlSink, name: &str, body: Vec<u8>) {
    aml::Device::new(name.into(), vec![&Raw(body)]).to_aml_bytes(sink);
}

/// `Device (GED_)`: ACPI0013 on [`GED_GSI`]; `_EVT` scans every status byte.
struct GedAml {
    cpus: u8,
    blocks: u8,
}

/// `If (And (PATH, BIT)) { Store (BIT, PATH) Notify (DEVICE, VALUE) }`
fn notify_if(sink: &mut dyn AmlSink, device: &str, field: &str, bit: u8, value: u8) {
    let dev = aml::Path::new(device);
    let path = aml::Path::new(&format!("{device}.{field}"));
    let test = aml::And::new(&aml::ZERO, &path, &bit);
    let ack = aml::Store::new(&path, &bit);
    let notify = aml::Notify::new(&dev, &value);
    aml::If::new(&test, vec![&ack, &notify]).to_aml_bytes(sink);
}

impl Aml for GedAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let mut evt = Vec::new();
        for id in 0..self.cpus {
            let dev = format!("\\_SB_.{}", cpu_name(id));
            notify_if(&mut evt, &dev, "CSTA", INSERT, 1);
            notify_if(&mut evt, &dev, "CSTA", REMOVE, 3);
        }
        for block in 0..self.blocks {
            let dev = format!("\\_SB_.{}", mem_name(block));
            notify_if(&mut evt, &dev, "MSTA", INSERT, 1);
        }
        let mut body = Vec::new();
        aml::Name::new("_HID".into(), &"ACPI0013").to_aml_bytes(&mut body);
        aml::Name::new("_UID".into(), &aml::ZERO).to_aml_bytes(&mut body);
        let irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
        aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]))
            .to_aml_bytes(&mut body);
        aml::Method::new("_EVT".into(), 1, true, vec![&Raw(evt)]).to_aml_bytes(&mut body);
        device(sink, "GED_", body);
    }
}

/// The hot-plug status bytes, shared by the VM thread (which adds and asks to remove) and the
/// vCPU threads (the guest's port accesses).
#[derive(Debug, Default)]
pub struct HotplugState {
    /// One byte per possible vCPU.
    pub cpus: Vec<u8>,
    /// One byte per RAM block.
    pub mem: Vec<u8>,
}

impl HotplugState {
    /// vCPUs the guest has (present and not ejected).
    pub fn present_cpus(&self) -> u8 {
        self.cpus.iter().filter(|s| *s & PRESENT != 0).count() as u8
    }

    /// RAM blocks plugged.
    pub fn present_blocks(&self) -> usize {
        self.mem.iter().filter(|s| *s & PRESENT != 0).count()
    }
}

/// The hot-plug controller on the port I/O bus: [`CPU_PORT`].. and [`MEM_PORT`]...
pub struct HotplugController {
    state: Arc<Mutex<HotplugState>>,
}

impl HotplugController {
    /// A controller for `layout`, with the boot vCPUs present.
    pub fn new(layout: &HotplugLayout) -> (Self, Arc<Mutex<HotplugState>>) {
        let mut cpus = vec![0u8; usize::from(layout.max_cpus)];
        for c in cpus.iter_mut().take(usize::from(layout.boot_cpus)) {
            *c = PRESENT;
        }
        let state = Arc::new(Mutex::new(HotplugState {
            cpus,
            mem: vec![0; layout.mem_blocks.len()],
        }));
        (
            Self {
                state: state.clone(),
            },
            state,
        )
    }

    fn byte(state: &mut HotplugState, base: u64, offset: u64) -> Option<&mut u8> {
        let i = usize::try_from(offset).ok()?;
        if base == u64::from(CPU_PORT) {
            state.cpus.get_mut(i)
        } else if base == u64::from(MEM_PORT) {
            state.mem.get_mut(i)
        } else {
            None
        }
    }
}

impl BusDevice for HotplugController {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let v = Self::byte(&mut s, base, offset).map_or(0, |b| *b);
        data.fill(0);
        if let Some(d) = data.first_mut() {
            *d = v;
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let cpu = base == u64::from(CPU_PORT);
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(b) = Self::byte(&mut s, base, offset) else {
            return;
        };
        // Acknowledgements clear the pending notifications.
        *b &= !(v & (INSERT | REMOVE));
        // The boot processor, vCPU 0, is never ejected.
        if cpu && v & EJECT != 0 && offset != 0 && *b & PRESENT != 0 {
            *b = 0;
            log::info!("guest ejected vCPU {offset}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn config(cpus: u8, max_cpus: Option<u8>, memory: u64, max: Option<u64>) -> VmConfig {
        let mut c = VmConfig::new(PathBuf::from("/k"));
        c.cpus = cpus;
        c.max_cpus = max_cpus;
        c.memory = memory;
        c.max_memory = max;
        c
    }

    #[test]
    fn layouts() {
        let l = HotplugLayout::new(&config(1, None, 512 << 20, None));
        assert!(!l.enabled());
        assert!(l.aml().is_empty());
        let l = HotplugLayout::new(&config(2, Some(3), 256 << 20, Some(768 << 20)));
        assert!(l.enabled());
        assert_eq!(l.block_size(), 128 << 20);
        assert_eq!(l.mem_blocks.len(), 4);
        assert_eq!(l.mem_blocks[0].0, 4 << 30);
        assert_eq!(l.mem_blocks[3], ((4 << 30) + (384 << 20), 128 << 20));
        // 34 granules: 2 blocks of 17 (16 does not divide 34, 17 is too many).
        let l = HotplugLayout::new(&config(
            1,
            None,
            1 << 30,
            Some((1 << 30) + 34 * (128 << 20)),
        ));
        assert_eq!((l.mem_blocks.len(), l.block_size()), (2, 17 * (128 << 20)));
        // Boot RAM above 4 GiB (3 GiB low, 1 GiB from 4 GiB on): blocks start above it.
        let l = HotplugLayout::new(&config(1, None, 4 << 30, Some(5 << 30)));
        assert_eq!(l.mem_blocks[0].0, 5 << 30);
        let l = HotplugLayout::new(&config(1, None, (4 << 30) + (1 << 20), Some(5 << 30)));
        assert_eq!(l.mem_blocks[0].0, 6 << 30);
    }

    #[test]
    fn controller_bytes() {
        let layout = HotplugLayout {
            boot_cpus: 2,
            max_cpus: 3,
            mem_blocks: vec![(4 << 30, 128 << 20)],
        };
        let (mut c, state) = HotplugController::new(&layout);
        let read = |c: &mut HotplugController, base: u16, i: u64| {
            let mut b = [0xffu8; 1];
            c.read(u64::from(base), i, &mut b);
            b[0]
        };
        assert_eq!(read(&mut c, CPU_PORT, 1), PRESENT);
        assert_eq!(read(&mut c, CPU_PORT, 2), 0);
        assert_eq!(read(&mut c, CPU_PORT, 9), 0, "beyond max_cpus");
        state.lock().unwrap().cpus[2] = PRESENT | INSERT;
        assert_eq!(read(&mut c, CPU_PORT, 2), PRESENT | INSERT);
        c.write(u64::from(CPU_PORT), 2, &[INSERT]);
        assert_eq!(read(&mut c, CPU_PORT, 2), PRESENT);
        assert_eq!(state.lock().unwrap().present_cpus(), 3);
        // vCPU 0 is never ejected.
        c.write(u64::from(CPU_PORT), 0, &[EJECT]);
        assert_eq!(read(&mut c, CPU_PORT, 0), PRESENT);
        state.lock().unwrap().cpus[2] |= REMOVE;
        c.write(u64::from(CPU_PORT), 2, &[REMOVE]);
        c.write(u64::from(CPU_PORT), 2, &[EJECT]);
        assert_eq!(read(&mut c, CPU_PORT, 2), 0);
        assert_eq!(state.lock().unwrap().present_cpus(), 2);
        state.lock().unwrap().mem[0] = PRESENT | INSERT;
        c.write(u64::from(MEM_PORT), 0, &[INSERT]);
        assert_eq!(read(&mut c, MEM_PORT, 0), PRESENT);
        assert_eq!(state.lock().unwrap().present_blocks(), 1);
    }

    #[test]
    fn aml_has_the_devices() {
        let layout = HotplugLayout {
            boot_cpus: 1,
            max_cpus: 2,
            mem_blocks: vec![(4 << 30, 128 << 20)],
        };
        let aml = layout.aml();
        let has = |s: &[u8]| aml.windows(s.len()).any(|w| w == s);
        assert!(has(b"C000") && has(b"C001") && has(b"M000") && has(b"GED_"));
        assert!(has(b"ACPI0007\0") && has(b"ACPI0013\0"));
        assert!(has(b"_EJ0") && has(b"_EVT") && has(b"_MAT"));
        // The GED's interrupt: extended IRQ descriptor, consumer, edge, GSI 5.
        assert!(has(&[0x89, 6, 0, 0x03, 1, 5, 0, 0, 0]));
    }
}
