//! Tiny guest programs for tests on /dev/kvm: a little x86-64 assembler for the handful of
//! instructions the tests need, and a minimal ELF wrapper so the `vmm` binary can boot them
//! as a "kernel" (the 64-bit entry, like a vmlinux).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Where the test programs are loaded and entered (the vmlinux-style load address).
pub const CODE_START: u64 = 0x10_0000;
pub const COM1: u16 = 0x3f8;
pub const PM1A_CNT: u16 = 0x604;

/// Whether /dev/kvm can be used; prints why a test is skipped when not.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipping: /dev/kvm is not usable ({e})");
            false
        }
    }
}

/// Machine code being assembled (64-bit mode encodings).
#[derive(Default)]
pub struct Asm(pub Vec<u8>);

impl Asm {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn mov_dx(self, v: u16) -> Self {
        let [lo, hi] = v.to_le_bytes();
        self.raw(&[0x66, 0xba, lo, hi])
    }
    pub fn mov_al(self, v: u8) -> Self {
        self.raw(&[0xb0, v])
    }
    pub fn mov_ax(self, v: u16) -> Self {
        let [lo, hi] = v.to_le_bytes();
        self.raw(&[0x66, 0xb8, lo, hi])
    }
    pub fn mov_eax(self, v: u32) -> Self {
        self.raw(&[0xb8]).raw(&v.to_le_bytes())
    }
    pub fn mov_rax(self, v: u64) -> Self {
        self.raw(&[0x48, 0xb8]).raw(&v.to_le_bytes())
    }
    /// `out dx, al`
    pub fn out_al(self) -> Self {
        self.raw(&[0xee])
    }
    /// `out dx, ax`
    pub fn out_ax(self) -> Self {
        self.raw(&[0x66, 0xef])
    }
    /// `in al, dx`
    pub fn in_al(self) -> Self {
        self.raw(&[0xec])
    }
    /// `mov [moffs64], eax` (a 32-bit displacement would be sign-extended above 2 GiB)
    pub fn store_eax(self, addr: u64) -> Self {
        self.raw(&[0xa3]).raw(&addr.to_le_bytes())
    }
    /// `mov eax, [moffs64]`
    pub fn load_eax(self, addr: u64) -> Self {
        self.raw(&[0xa1]).raw(&addr.to_le_bytes())
    }
    /// Write `text` to COM1, one `out` per byte.
    pub fn print(mut self, text: &[u8]) -> Self {
        self = self.mov_dx(COM1);
        for &b in text {
            self = self.mov_al(b).out_al();
        }
        self
    }
    /// ACPI S5 through PM1a_CNT: SLP_TYP 5, SLP_EN.
    pub fn poweroff(self) -> Self {
        self.mov_dx(PM1A_CNT).mov_ax((5 << 10) | (1 << 13)).out_ax()
    }
    /// `hlt; jmp $-1` (stay put if anything goes on running).
    pub fn halt(self) -> Self {
        self.raw(&[0xf4, 0xeb, 0xfd])
    }
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Wrap `code` in an ELF64 executable with one PT_LOAD segment at [`CODE_START`].
pub fn elf(code: &[u8]) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&CODE_START.to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    let offset = 0x1000u64;
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [
        offset,
        CODE_START,
        CODE_START,
        code.len() as u64,
        code.len() as u64,
        0x1000,
    ] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.resize(offset as usize, 0);
    e.extend_from_slice(code);
    e
}

/// Write the program as an ELF "kernel" into `dir`.
pub fn write_kernel(dir: &Path, name: &str, code: &Asm) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, elf(code.bytes())).expect("write test kernel");
    path
}
