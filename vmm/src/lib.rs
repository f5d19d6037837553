//! `vmm`: a lean KVM virtual machine monitor whose devices are vhost-user daemons.
//!
//! One thread owns the VM ([`vm`]); every other thread (vCPUs, the control [`api`] server)
//! talks to it through [`vm::VmHandle`], a request channel plus an eventfd wake-up. The VMM itself emulates
//! only what a Linux guest probes at boot: an 8250 serial port, an i8042 reset line, the CMOS
//! clock and ACPI power management. Disks, network, file systems and consoles are virtio-pci
//! devices served by vhost-user daemons (see [`vhost_user`]).

pub mod api;
pub mod boot;
pub mod bus;
pub mod config;
pub mod devices;
pub mod hotplug;
pub mod layout;
pub mod memory;
pub mod vcpu;
pub mod vm;

pub mod interrupt;
pub mod pci;
pub mod vhost_user;
pub mod virtio;

pub use config::VmConfig;
pub use vm::{ExitStatus, VmHandle};
