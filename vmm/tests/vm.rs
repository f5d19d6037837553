//! The VM built through the library on /dev/kvm with tiny guest programs: memory slots, the
//! buses vCPU exits are dispatched to, and the VM thread's request channel.

mod common;

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use vm_memory::{Bytes, GuestAddress};
use vmm::boot::BootEntry;
use vmm::bus::BusDevice;
use vmm::devices::legacy::PowerEvent;
use vmm::vm::{channel_pair, Vm, VmHandle, VmMessage};

/// Records writes, answers reads with a fixed pattern.
#[derive(Default)]
struct Probe {
    writes: Vec<(u64, u64, Vec<u8>)>,
}

impl BusDevice for Probe {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = 0xa0 + offset as u8 + i as u8;
        }
    }
    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        self.writes.push((base, offset, data.to_vec()));
    }
}

fn new_vm(cpus: u8) -> (Vm, VmHandle, Receiver<VmMessage>) {
    let (handle, rx, _wake) = channel_pair().unwrap();
    let vm = Vm::create(cpus, 16 << 20, false, &handle, Some(None)).unwrap();
    (vm, handle, rx)
}

fn start(vm: &mut Vm, handle: &VmHandle, code: &Asm) {
    vm.memory()
        .write_slice(code.bytes(), GuestAddress(CODE_START))
        .unwrap();
    let entry = BootEntry {
        entry: CODE_START,
        zero_page: 0x7000,
    };
    vm.start(entry, handle).unwrap();
}

fn wait_power_off(rx: &Receiver<VmMessage>) {
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(VmMessage::Power(PowerEvent::PowerOff)) => return,
            Ok(VmMessage::Vcpu(id, e)) => panic!("vCPU {id} stopped: {e:?}"),
            Ok(_) => {}
            Err(e) => panic!("no power-off from the guest: {e}"),
        }
    }
}

#[test]
fn mmio_exits_reach_the_mmio_bus() {
    if !kvm_available() {
        return;
    }
    let (mut vm, handle, rx) = new_vm(1);
    let probe = Arc::new(Mutex::new(Probe::default()));
    // An address in the 32-bit PCI window, where BARs live.
    vm.mmio_bus()
        .insert(probe.clone(), 0xd000_0000, 0x1000)
        .unwrap();
    // Store to the device, load from it, store what was loaded to RAM.
    let code = Asm::new()
        .mov_eax(0x1234_5678)
        .store_eax(0xd000_0010)
        .load_eax(0xd000_0020)
        .store_eax(0x20_0000)
        .poweroff()
        .halt();
    start(&mut vm, &handle, &code);
    wait_power_off(&rx);
    vm.shutdown();
    let writes = probe.lock().unwrap().writes.clone();
    assert_eq!(
        writes,
        vec![(0xd000_0000, 0x10, 0x1234_5678u32.to_le_bytes().to_vec())]
    );
    let loaded: u32 = vm.memory().read_obj(GuestAddress(0x20_0000)).unwrap();
    assert_eq!(loaded.to_le_bytes(), [0xc0, 0xc1, 0xc2, 0xc3]);
}

#[test]
fn guest_and_host_share_memory_through_the_memfd() {
    if !kvm_available() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let (mut vm, handle, rx) = new_vm(1);
    // The host writes a pattern through the memfd; the guest copies it elsewhere and
    // writes its own marker; the host reads both back through the memfd.
    vm.memory_file()
        .write_all_at(&0xcafe_f00du32.to_le_bytes(), 0x30_0000)
        .unwrap();
    let code = Asm::new()
        .load_eax(0x30_0000)
        .store_eax(0x30_0100)
        .mov_eax(0x600d_beef)
        .store_eax(0x30_0200)
        .poweroff()
        .halt();
    start(&mut vm, &handle, &code);
    wait_power_off(&rx);
    vm.shutdown();
    let mut b = [0u8; 4];
    vm.memory_file().read_exact_at(&mut b, 0x30_0100).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0xcafe_f00d);
    vm.memory_file().read_exact_at(&mut b, 0x30_0200).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0x600d_beef);
}

#[test]
fn port_io_reaches_the_pio_bus_and_unknown_ports_read_all_ones() {
    if !kvm_available() {
        return;
    }
    let (mut vm, handle, rx) = new_vm(1);
    let probe = Arc::new(Mutex::new(Probe::default()));
    vm.pio_bus().insert(probe.clone(), 0x510, 4).unwrap();
    // Read an unclaimed port and echo the value to the probe, then read the probe.
    let code = Asm::new()
        .mov_dx(0x2f8)
        .in_al()
        .mov_dx(0x512)
        .out_al()
        .in_al()
        .mov_dx(0x511)
        .out_al()
        .poweroff()
        .halt();
    start(&mut vm, &handle, &code);
    wait_power_off(&rx);
    vm.shutdown();
    let writes = probe.lock().unwrap().writes.clone();
    assert_eq!(writes, vec![(0x510, 2, vec![0xff]), (0x510, 1, vec![0xa2])]);
}

#[test]
fn requests_pause_resume_report_and_shut_down_the_vm() {
    if !kvm_available() {
        return;
    }
    use vmm::api::{ApiError, ApiRequest, ApiResponse, VmState};
    use vmm::config::SerialMode;
    use vmm::vm::{ExitStatus, Vmm};
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "spin.elf", &Asm::new().raw(&[0xeb, 0xfe]));
    let mut config = vmm::VmConfig::new(kernel);
    config.memory = 16 << 20;
    config.cpus = 2;
    config.serial = SerialMode::Off;
    let vmm = Vmm::new(Some(config)).unwrap();
    let handle = vmm.handle();
    let thread = std::thread::spawn(move || vmm.run());
    let state = |h: &VmHandle| match h.request(ApiRequest::VmInfo) {
        Ok(ApiResponse::Info(i)) => {
            assert_eq!((i.cpus, i.memory, i.boots), (2, 16 << 20, 1));
            i.state
        }
        other => panic!("info: {other:?}"),
    };
    assert_eq!(state(&handle), VmState::Running);
    assert_eq!(handle.request(ApiRequest::VmPause), Ok(ApiResponse::Done));
    assert_eq!(state(&handle), VmState::Paused);
    assert!(matches!(
        handle.request(ApiRequest::VmPause),
        Err(ApiError::WrongState(_))
    ));
    assert_eq!(handle.request(ApiRequest::VmResume), Ok(ApiResponse::Done));
    assert_eq!(state(&handle), VmState::Running);
    assert_eq!(
        handle.request(ApiRequest::VmmShutdown),
        Ok(ApiResponse::Done)
    );
    assert_eq!(thread.join().unwrap().unwrap(), ExitStatus::Shutdown);
    assert_eq!(handle.request(ApiRequest::VmInfo), Err(ApiError::Gone));
}
