//! The FUSE protocol as carried by virtio-fs: wire structures ([`abi`]), decoding of a request
//! body ([`BodyReader`]) and the two transport hooks the request dispatcher needs to move file
//! data straight between a file and guest memory ([`ReplySink`], [`WritePayload`]).
//!
//! Nothing here knows about virtqueues or about the host filesystem.

pub mod abi;

use std::io;
use std::os::fd::BorrowedFd;

use vm_memory::ByteValued;

/// A request that cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The body ended before a fixed-size argument.
    #[error("request body too short: {needed} bytes needed, {left} left")]
    Truncated {
        /// Bytes the argument needs.
        needed: usize,
        /// Bytes left in the body.
        left: usize,
    },
    /// A name argument has no terminating NUL.
    #[error("name argument without terminating NUL")]
    Unterminated,
}

/// Reads the arguments of a request body in order.
pub struct BodyReader<'a> {
    buf: &'a [u8],
}

impl<'a> BodyReader<'a> {
    /// A reader over `buf` (the bytes after the in-header).
    pub fn new(buf: &'a [u8]) -> Self {
        BodyReader { buf }
    }

    /// The next fixed-size argument.
    pub fn obj<T: ByteValued>(&mut self) -> Result<T, DecodeError> {
        let size = std::mem::size_of::<T>();
        let bytes = self.bytes(size)?;
        // SAFETY: `bytes` holds exactly size_of::<T>() bytes and ByteValued types accept any
        // bit pattern; read_unaligned does not need the buffer to be aligned for T.
        Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
    }

    /// The next `len` raw bytes.
    pub fn bytes(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < len {
            return Err(DecodeError::Truncated {
                needed: len,
                left: self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }

    /// The next NUL-terminated string, without its NUL.
    pub fn name(&mut self) -> Result<&'a [u8], DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Unterminated)?;
        let (name, rest) = self.buf.split_at(end);
        self.buf = &rest[1..];
        Ok(name)
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
}

/// Where a reply goes: the writable part of a descriptor chain, or a buffer in tests.
pub trait ReplySink {
    /// Bytes the reply may take, header included.
    fn capacity(&self) -> usize;
    /// Write `parts` one after the other from the start of the reply area.
    fn write_at(&mut self, offset: usize, parts: &[&[u8]]) -> io::Result<()>;
    /// Read up to `len` bytes of `fd` at `file_offset` into the reply area at `offset`,
    /// directly (no intermediate buffer where the transport allows). Returns bytes read.
    fn read_file_into(
        &mut self,
        offset: usize,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        len: usize,
    ) -> io::Result<usize>;
}

/// The data of a WRITE request, still in the transport's buffers.
pub trait WritePayload {
    /// Bytes available.
    fn len(&self) -> usize;
    /// Whether there is no data.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Write up to `len` bytes of the payload to `fd` at `file_offset`. Returns bytes written.
    fn write_to_file(
        &mut self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        len: usize,
    ) -> io::Result<usize>;
}

/// A reply sink over a plain buffer (tests, and the bench's in-process frontend).
#[derive(Debug, Default)]
pub struct VecSink {
    /// The reply bytes written so far.
    pub buf: Vec<u8>,
    /// Capacity offered to the dispatcher.
    pub cap: usize,
}

impl VecSink {
    /// A sink offering `cap` bytes.
    pub fn new(cap: usize) -> Self {
        VecSink {
            buf: Vec::new(),
            cap,
        }
    }

    fn ensure(&mut self, end: usize) -> io::Result<()> {
        if end > self.cap {
            return Err(io::Error::from_raw_os_error(libc::ERANGE));
        }
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        Ok(())
    }
}

impl ReplySink for VecSink {
    fn capacity(&self) -> usize {
        self.cap
    }

    fn write_at(&mut self, offset: usize, parts: &[&[u8]]) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        self.ensure(offset + total)?;
        let mut at = offset;
        for p in parts {
            self.buf[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        Ok(())
    }

    fn read_file_into(
        &mut self,
        offset: usize,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        len: usize,
    ) -> io::Result<usize> {
        let mut tmp = vec![0u8; len];
        let n = crate::sys::pread(fd, &mut tmp, file_offset)?;
        self.write_at(offset, &[&tmp[..n]])?;
        Ok(n)
    }
}

/// A write payload in a plain buffer.
pub struct SlicePayload<'a>(pub &'a [u8]);

impl WritePayload for SlicePayload<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn write_to_file(
        &mut self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        len: usize,
    ) -> io::Result<usize> {
        let n = len.min(self.0.len());
        crate::sys::pwrite(fd, &self.0[..n], file_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_reader_decodes_and_rejects() {
        let mut body = Vec::new();
        body.extend_from_slice(
            abi::MkdirIn {
                mode: 0o755,
                umask: 0o22,
            }
            .as_slice(),
        );
        body.extend_from_slice(b"dir\0");
        let mut r = BodyReader::new(&body);
        let m: abi::MkdirIn = r.obj().unwrap();
        assert_eq!((m.mode, m.umask), (0o755, 0o22));
        assert_eq!(r.name().unwrap(), b"dir");
        assert_eq!(r.remaining(), 0);
        assert_eq!(
            r.obj::<abi::MkdirIn>().unwrap_err(),
            DecodeError::Truncated { needed: 8, left: 0 }
        );
        let mut r = BodyReader::new(b"noterminator");
        assert_eq!(r.name().unwrap_err(), DecodeError::Unterminated);
    }

    #[test]
    fn vec_sink_refuses_writes_past_capacity() {
        let mut s = VecSink::new(8);
        s.write_at(0, &[b"1234", b"5678"]).unwrap();
        assert!(s.write_at(4, &[b"12345"]).is_err());
        assert_eq!(s.buf, b"12345678");
    }
}
