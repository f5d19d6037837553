//! virtio-blk requests (virtio spec 5.2) built in guest memory: for block-device tests and
//! benchmarks against any vhost-user-blk daemon.

use crate::frontend::{Completion, Session};
use crate::queue::Desc;

/// Read.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush the write cache.
pub const T_FLUSH: u32 = 4;
/// Serial number.
pub const T_GET_ID: u32 = 8;
/// Deallocate ranges.
pub const T_DISCARD: u32 = 11;
/// Zero ranges.
pub const T_WRITE_ZEROES: u32 = 13;

/// Success.
pub const S_OK: u8 = 0;
/// Failure.
pub const S_IOERR: u8 = 1;
/// Request type not supported.
pub const S_UNSUPP: u8 = 2;

/// WRITE_ZEROES range flag: the device may deallocate.
pub const WRITE_ZEROES_UNMAP: u32 = 1;

/// Sector size of the protocol.
pub const SECTOR: u64 = 512;

/// Feature bits (the number is the bit).
pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};

/// The fields of struct virtio_blk_config a driver uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment.
    pub size_max: u32,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Logical block size.
    pub blk_size: u32,
    /// Write cache on.
    pub writeback: u8,
    /// Request queues.
    pub num_queues: u16,
    /// Most sectors per discard range.
    pub max_discard_sectors: u32,
    /// Most discard ranges per request.
    pub max_discard_seg: u32,
    /// Discard granularity in sectors.
    pub discard_sector_alignment: u32,
    /// Most sectors per write-zeroes range.
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes ranges per request.
    pub max_write_zeroes_seg: u32,
    /// Write-zeroes may deallocate.
    pub write_zeroes_may_unmap: u8,
}

/// Bytes of virtio_blk_config up to `write_zeroes_may_unmap`.
pub const CONFIG_LEN: u32 = 57;

impl Config {
    /// Parse config space bytes (at least [`CONFIG_LEN`] of them, from offset 0).
    pub fn parse(b: &[u8]) -> Option<Config> {
        if b.len() < CONFIG_LEN as usize {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut capacity = [0u8; 8];
        capacity.copy_from_slice(&b[0..8]);
        Some(Config {
            capacity: u64::from_le_bytes(capacity),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            writeback: b[32],
            num_queues: u16::from_le_bytes([b[34], b[35]]),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56],
        })
    }
}

/// The 16-byte request header.
pub fn header(request_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One DISCARD / WRITE_ZEROES range.
pub fn range(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[0..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&sectors.to_le_bytes());
    r[12..16].copy_from_slice(&flags.to_le_bytes());
    r
}

/// The answer to a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The status byte.
    pub status: u8,
    /// What the device wrote into the data buffer (IN, GET_ID).
    pub data: Vec<u8>,
    /// The used length the device reported.
    pub used_len: u32,
}

/// Synchronous virtio-blk requests.
impl Session {
    /// Run a request: header, then `out` as one readable buffer if not empty, then `in_len`
    /// writable bytes if not zero, then the status byte. None if the daemon hung up.
    pub fn blk_request(
        &mut self,
        q: usize,
        request_type: u32,
        sector: u64,
        out: &[u8],
        in_len: usize,
    ) -> Option<Reply> {
        let hdr = self.guest.put(&header(request_type, sector));
        let mut chain = vec![Desc::readable(hdr, 16)];
        if !out.is_empty() {
            chain.push(Desc::readable(self.guest.put(out), out.len() as u32));
        }
        let data = self.guest.alloc(in_len);
        if in_len > 0 {
            chain.push(Desc::writable(data, in_len as u32));
        }
        let status = self.guest.put(&[0xff]);
        chain.push(Desc::writable(status, 1));
        match self.run(q, &chain) {
            Completion::Used(u) => Some(Reply {
                status: self.guest.read(status, 1)[0],
                data: self.guest.read(data, in_len),
                used_len: u.len,
            }),
            Completion::Disconnected => None,
        }
    }

    /// Read `len` bytes at `sector` (IN).
    pub fn blk_read(&mut self, q: usize, sector: u64, len: usize) -> Reply {
        self.blk_request(q, T_IN, sector, &[], len)
            .expect("daemon answers a read")
    }

    /// Write `data` at `sector` (OUT); returns the status.
    pub fn blk_write(&mut self, q: usize, sector: u64, data: &[u8]) -> u8 {
        self.blk_request(q, T_OUT, sector, data, 0)
            .expect("daemon answers a write")
            .status
    }

    /// FLUSH; returns the status.
    pub fn blk_flush(&mut self, q: usize) -> u8 {
        self.blk_request(q, T_FLUSH, 0, &[], 0)
            .expect("daemon answers a flush")
            .status
    }
}
