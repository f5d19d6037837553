//! 16550A UART (COM1): output to a writer, input queued by the VM thread, interrupts through
//! an irqfd.
//!
//! Transmission is instantaneous, so the transmitter is always empty; what matters for Linux
//! is that the THR-empty interrupt is raised again whenever it is enabled, and that reading
//! IIR acknowledges it.

use std::collections::VecDeque;
use std::io::Write;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

const DATA: u64 = 0;
const IER: u64 = 1;
const IIR_FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;

const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_MASK: u8 = 0x0f;
const IIR_NO_INT: u8 = 0x01;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_FIFO_ENABLED: u8 = 0xc0;
const LCR_DLAB: u8 = 0x80;
const LSR_DR: u8 = 0x01;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const MCR_LOOP: u8 = 0x10;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_DCD: u8 = 0x80;

/// Input bytes held for the guest; more is dropped (the guest is not reading).
const INPUT_CAPACITY: usize = 4096;

/// An 8250/16550A serial port.
pub struct Serial {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    fcr: u8,
    dll: u8,
    dlm: u8,
    thr_empty_pending: bool,
    input: VecDeque<u8>,
    out: Option<Box<dyn Write + Send>>,
    irq: EventFd,
}

impl Serial {
    /// A port writing to `out` (None: output discarded) and signalling `irq`.
    pub fn new(out: Option<Box<dyn Write + Send>>, irq: EventFd) -> Self {
        Self {
            ier: 0,
            lcr: 0x03,
            mcr: 0x08,
            scr: 0,
            fcr: 0,
            dll: 0x0c,
            dlm: 0,
            thr_empty_pending: false,
            input: VecDeque::new(),
            out,
            irq,
        }
    }

    fn raise(&self) {
        if let Err(e) = self.irq.write(1) {
            log::warn!("serial: cannot signal the interrupt: {e}");
        }
    }

    fn update_interrupt(&self) {
        if self.pending_interrupt() != IIR_NO_INT {
            self.raise();
        }
    }

    fn pending_interrupt(&self) -> u8 {
        if self.ier & IER_RDI != 0 && !self.input.is_empty() {
            IIR_RDI
        } else if self.ier & IER_THRI != 0 && self.thr_empty_pending {
            IIR_THRI
        } else {
            IIR_NO_INT
        }
    }

    /// Queue bytes typed by the user; returns how many were accepted.
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        let room = INPUT_CAPACITY.saturating_sub(self.input.len());
        let n = bytes.len().min(room);
        self.input.extend(&bytes[..n]);
        if n > 0 {
            self.update_interrupt();
        }
        n
    }

    fn transmit(&mut self, byte: u8) {
        if self.mcr & MCR_LOOP != 0 {
            if self.input.len() < INPUT_CAPACITY {
                self.input.push_back(byte);
            }
        } else if let Some(out) = self.out.as_mut() {
            // A broken console must not stop the guest; the byte is lost.
            if out.write_all(&[byte]).and_then(|_| out.flush()).is_err() {
                self.out = None;
                log::warn!("serial: output failed, console output is discarded from now on");
            }
        }
        self.thr_empty_pending = true;
        self.update_interrupt();
    }

    fn read_reg(&mut self, offset: u64) -> u8 {
        match offset {
            DATA if self.lcr & LCR_DLAB != 0 => self.dll,
            DATA => {
                let byte = self.input.pop_front().unwrap_or(0);
                self.update_interrupt();
                byte
            }
            IER if self.lcr & LCR_DLAB != 0 => self.dlm,
            IER => self.ier,
            IIR_FCR => {
                let iir = self.pending_interrupt();
                if iir == IIR_THRI {
                    self.thr_empty_pending = false;
                }
                let fifo = if self.fcr & 1 != 0 {
                    IIR_FIFO_ENABLED
                } else {
                    0
                };
                iir | fifo
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let dr = if self.input.is_empty() { 0 } else { LSR_DR };
                dr | LSR_THRE | LSR_TEMT
            }
            MSR => {
                if self.mcr & MCR_LOOP != 0 {
                    // Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                    let m = self.mcr;
                    ((m & 0x01) << 5) | ((m & 0x02) << 3) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
                } else {
                    MSR_DCD | MSR_DSR | MSR_CTS
                }
            }
            SCR => self.scr,
            _ => 0xff,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u8) {
        match offset {
            DATA if self.lcr & LCR_DLAB != 0 => self.dll = value,
            DATA => self.transmit(value),
            IER if self.lcr & LCR_DLAB != 0 => self.dlm = value,
            IER => {
                let enabling_thri = value & IER_THRI != 0;
                self.ier = value & IER_MASK;
                // A 16550 re-asserts THRE whenever the interrupt is enabled while idle;
                // Linux tests for exactly this at port startup.
                if enabling_thri {
                    self.thr_empty_pending = true;
                }
                self.update_interrupt();
            }
            IIR_FCR => {
                self.fcr = value;
                if value & 0x02 != 0 {
                    self.input.clear();
                }
            }
            LCR => self.lcr = value,
            MCR => self.mcr = value & 0x1f,
            SCR => self.scr = value,
            _ => {}
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if let Some((first, rest)) = data.split_first_mut() {
            *first = self.read_reg(offset);
            rest.fill(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            self.write_reg(offset, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (Serial, Sink, EventFd) {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let s = Serial::new(Some(Box::new(sink.clone())), irq.try_clone().unwrap());
        (s, sink, irq)
    }

    fn inb(s: &mut Serial, off: u64) -> u8 {
        let mut b = [0];
        s.read(0x3f8, off, &mut b);
        b[0]
    }

    #[test]
    fn output_reaches_the_writer_and_raises_thre() {
        let (mut s, sink, irq) = serial();
        s.write(0x3f8, IER, &[IER_THRI]);
        assert_eq!(irq.read().unwrap(), 1, "enabling THRI raises an interrupt");
        assert_eq!(inb(&mut s, IIR_FCR) & 0x0f, IIR_THRI);
        assert_eq!(
            inb(&mut s, IIR_FCR) & 0x0f,
            IIR_NO_INT,
            "reading IIR acks THRE"
        );
        for b in b"hi\n" {
            s.write(0x3f8, DATA, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(irq.read().unwrap(), 3);
        assert_eq!(
            inb(&mut s, LSR) & (LSR_THRE | LSR_TEMT),
            LSR_THRE | LSR_TEMT
        );
    }

    #[test]
    fn input_is_read_in_order_with_data_ready() {
        let (mut s, _sink, irq) = serial();
        s.write(0x3f8, IER, &[IER_RDI]);
        assert_eq!(s.queue_input(b"ab"), 2);
        assert!(irq.read().unwrap() >= 1);
        assert_eq!(inb(&mut s, IIR_FCR) & 0x0f, IIR_RDI);
        assert_eq!(inb(&mut s, LSR) & LSR_DR, LSR_DR);
        assert_eq!(inb(&mut s, DATA), b'a');
        assert_eq!(inb(&mut s, DATA), b'b');
        assert_eq!(inb(&mut s, LSR) & LSR_DR, 0);
    }

    #[test]
    fn passes_linux_probe_scratch_and_loopback() {
        let (mut s, sink, _irq) = serial();
        s.write(0x3f8, SCR, &[0xa5]);
        assert_eq!(inb(&mut s, SCR), 0xa5);
        s.write(0x3f8, MCR, &[MCR_LOOP | 0x0a]);
        assert_eq!(inb(&mut s, MSR) & 0xf0, 0x90);
        s.write(0x3f8, DATA, &[0x55]);
        assert_eq!(inb(&mut s, DATA), 0x55, "loopback echoes");
        assert!(sink.0.lock().unwrap().is_empty());
        s.write(0x3f8, LCR, &[LCR_DLAB]);
        s.write(0x3f8, DATA, &[0x01]);
        assert_eq!(inb(&mut s, DATA), 0x01, "divisor latch");
    }
}
