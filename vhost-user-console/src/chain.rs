//! Descriptor chains from a guest that may be hostile: every chain is walked completely and
//! checked before any byte moves, so a bad chain is returned untouched with an error.

use std::collections::VecDeque;
use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory};

/// Most descriptors accepted in one chain (direct or through an indirect table).
pub const MAX_DESCRIPTORS: usize = 1024;
/// Most bytes one transmit chain may carry (Linux writes at most 32 KiB per buffer).
pub const MAX_TX_BYTES: usize = 1 << 20;

/// Why a chain was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The walk ended early: a loop, a next index beyond the table, a bad indirect table or a
    /// descriptor table outside guest memory.
    #[error("broken chain (loop, index beyond the table, or bad indirect table)")]
    Broken,
    /// More descriptors than [`MAX_DESCRIPTORS`].
    #[error("chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    /// A buffer the device must read is writable, or the other way round.
    #[error("{0} descriptor where the queue needs the other direction")]
    WrongDirection(&'static str),
    /// A transmit chain larger than [`MAX_TX_BYTES`].
    #[error("transmit chain of {0} bytes exceeds {MAX_TX_BYTES}")]
    TooBig(u64),
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer outside guest memory")]
    OutsideMemory,
    /// A control buffer too small for the message.
    #[error("receive buffer of {0} bytes cannot hold a {1}-byte message")]
    TooSmall(u64, usize),
}

/// Walk `chain` into `out`, requiring every descriptor to be device-writable (`writable`) or
/// device-readable (`!writable`).
pub fn collect<M>(
    chain: DescriptorChain<M>,
    writable: bool,
    out: &mut Vec<Descriptor>,
) -> Result<(), ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    out.clear();
    // The iterator stops silently on every kind of damage; a chain that ended properly ends
    // with a descriptor without NEXT.
    let mut ended = false;
    for d in chain {
        if out.len() == MAX_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        if d.is_write_only() != writable {
            return Err(ChainError::WrongDirection(if writable {
                "device-readable"
            } else {
                "device-writable"
            }));
        }
        ended = !d.has_next();
        out.push(d);
    }
    if ended {
        Ok(())
    } else {
        Err(ChainError::Broken)
    }
}

/// Append the bytes of device-readable `descs` to `out`; on error `out` is left as it was.
pub fn read_into<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    out: &mut Vec<u8>,
) -> Result<usize, ChainError> {
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if total > MAX_TX_BYTES as u64 {
        return Err(ChainError::TooBig(total));
    }
    let start = out.len();
    out.resize(start + total as usize, 0);
    let mut at = start;
    for d in descs {
        let len = d.len() as usize;
        if mem.read_slice(&mut out[at..at + len], d.addr()).is_err() {
            out.truncate(start);
            return Err(ChainError::OutsideMemory);
        }
        at += len;
    }
    Ok(total as usize)
}

/// Copy as much of `data` as fits into device-writable `descs`; returns the bytes copied.
fn scatter<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    data: &[u8],
) -> Result<usize, ChainError> {
    let mut done = 0usize;
    for d in descs {
        if done == data.len() {
            break;
        }
        let n = (d.len() as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + n], d.addr())
            .map_err(|_| ChainError::OutsideMemory)?;
        done += n;
    }
    Ok(done)
}

/// Move as much of `input` as fits into device-writable `descs`; returns the bytes written.
/// Input leaves the queue only when the whole copy succeeded.
pub fn write_from<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    input: &mut VecDeque<u8>,
) -> Result<u32, ChainError> {
    let done = scatter(mem, descs, input.make_contiguous())?;
    input.drain(..done);
    // At most MAX_DESCRIPTORS * u32::MAX in theory, but bounded by the input buffer in practice.
    Ok(u32::try_from(done).unwrap_or(u32::MAX))
}

/// Write all of `msg` into device-writable `descs` or nothing.
pub fn write_message<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    msg: &[u8],
) -> Result<u32, ChainError> {
    let room: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if room < msg.len() as u64 {
        return Err(ChainError::TooSmall(room, msg.len()));
    }
    // A control message is a few bytes plus at most a port name.
    Ok(scatter(mem, descs, msg)? as u32)
}

/// Read at most `buf.len()` bytes from the start of device-readable `descs`.
pub fn read_prefix<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    buf: &mut [u8],
) -> Result<usize, ChainError> {
    let mut done = 0usize;
    for d in descs {
        if done == buf.len() {
            break;
        }
        let n = (d.len() as usize).min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], d.addr())
            .map_err(|_| ChainError::OutsideMemory)?;
        done += n;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueOwnedT;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn walk(descs: &[RawDescriptor], writable: bool) -> Result<Vec<Descriptor>, ChainError> {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let q = MockSplitQueue::new(&mem, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        let mut out = Vec::new();
        collect(chain, writable, &mut out).map(|()| out)
    }

    #[test]
    fn accepts_a_proper_chain() {
        let d = walk(&[desc(0x2000, 4, NEXT, 1), desc(0x3000, 8, 0, 0)], false).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].len(), 8);
    }

    #[test]
    fn refuses_wrong_direction_and_loops() {
        assert_eq!(
            walk(&[desc(0x2000, 4, WRITE, 0)], false).map(|d| d.len()),
            Err(ChainError::WrongDirection("device-writable"))
        );
        // build_desc_chain links descriptor i to i+1; make the last point back to the first.
        let looped = [desc(0x2000, 4, NEXT, 1), desc(0x2000, 4, NEXT, 0)];
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let q = MockSplitQueue::new(&mem, 16);
        q.add_desc_chains(&looped, 0).unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        let mut out = Vec::new();
        assert_eq!(collect(chain, false, &mut out), Err(ChainError::Broken));
    }

    #[test]
    fn buffers_outside_memory_move_nothing() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let descs = [SplitDescriptor::new(0xfff0, 0x20, WRITE, 0)];
        let mut input: VecDeque<u8> = (0..100u8).collect();
        assert_eq!(
            write_from(&mem, &descs, &mut input),
            Err(ChainError::OutsideMemory)
        );
        assert_eq!(input.len(), 100);
        let mut out = b"keep".to_vec();
        let r = [SplitDescriptor::new(0xfff0, 0x20, 0, 0)];
        assert_eq!(
            read_into(&mem, &r, &mut out),
            Err(ChainError::OutsideMemory)
        );
        assert_eq!(out, b"keep");
    }
}
