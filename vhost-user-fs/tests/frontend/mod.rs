//! The virtio-fs driver of the socket tests and the benchmark: FUSE requests posted as
//! descriptor chains through the workspace's mock frontend (`vhost-user-test`).

#![allow(dead_code, unused_imports)]

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};

use vhost_user_fs::fuse::abi::{InHeader, OutHeader};
use vhost_user_test::{Completion, Options};
use vm_memory::ByteValued;

pub use vhost_user_test::{Daemon, Desc, DESC_F_NEXT as DESC_NEXT, DESC_F_WRITE as DESC_WRITE};

/// The daemon under test.
pub fn daemon_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vhost-user-fs"))
}

/// A FUSE reply: positive errno (0 = success) and payload.
#[derive(Debug)]
pub struct Reply {
    pub errno: i32,
    pub data: Vec<u8>,
    pub used: u32,
}

/// A connected virtio-fs frontend: queue 0 is hiprio, 1.. are request queues. Derefs to the
/// harness session (guest memory, queues, config space).
pub struct Session {
    inner: vhost_user_test::Session,
    unique: u64,
}

impl Deref for Session {
    type Target = vhost_user_test::Session;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl Session {
    pub fn connect(socket: &Path, nqueues: usize) -> Session {
        let opts = Options {
            num_queues: nqueues,
            ..Options::default()
        };
        Session {
            inner: vhost_user_test::Session::connect(socket, &opts).expect("connect"),
            unique: 0,
        }
    }

    /// Post `chain` on queue `q` and wait for it; returns the used length.
    pub fn run_chain(&mut self, q: usize, chain: &[Desc]) -> u32 {
        match self.inner.run(q, chain) {
            Completion::Used(u) => u.len,
            Completion::Disconnected => panic!("the daemon hung up"),
        }
    }

    /// Send a FUSE request on queue `q`: header + `body` (split into readable descriptors of at
    /// most `seg` bytes), reply room `reply_cap` (split likewise).
    pub fn request_split(
        &mut self,
        q: usize,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        reply_cap: usize,
        seg: usize,
    ) -> Reply {
        self.unique += 1;
        let h = InHeader {
            len: (40 + body.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            ..Default::default()
        };
        let mut req = h.as_slice().to_vec();
        req.extend_from_slice(body);
        let req_addr = self.guest.put(&req);
        let reply_addr = self.guest.alloc(reply_cap);
        let used = self.run_prepared(q, (req_addr, req.len()), reply_addr, reply_cap, seg);
        if used == 0 {
            return Reply {
                errno: -1,
                data: Vec::new(),
                used,
            };
        }
        let out = self.guest.read(reply_addr, used as usize);
        let oh = *OutHeader::from_slice(&out[..16]).unwrap();
        assert_eq!(oh.unique, self.unique, "reply to another request");
        assert_eq!(oh.len, used, "header length disagrees with used length");
        Reply {
            errno: -oh.error,
            data: out[16..].to_vec(),
            used,
        }
    }

    /// Write a request (header + body) into guest memory once, for reuse; returns its address
    /// and length.
    pub fn prepare(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> (u64, usize) {
        let h = InHeader {
            len: (40 + body.len()) as u32,
            opcode,
            unique: 1,
            nodeid,
            ..Default::default()
        };
        let mut req = h.as_slice().to_vec();
        req.extend_from_slice(body);
        (self.guest.put(&req), req.len())
    }

    /// Post a prepared request with `reply_cap` bytes of reply room at `reply_addr`, both
    /// split into `seg`-byte descriptors; returns the used length (no copies on our side).
    pub fn run_prepared(
        &mut self,
        q: usize,
        req: (u64, usize),
        reply_addr: u64,
        reply_cap: usize,
        seg: usize,
    ) -> u32 {
        let mut chain = Vec::new();
        for (off, len) in pieces(req.1, seg) {
            chain.push(Desc::readable(req.0 + off as u64, len as u32));
        }
        for (off, len) in pieces(reply_cap, seg) {
            chain.push(Desc::writable(reply_addr + off as u64, len as u32));
        }
        self.run_chain(q, &chain)
    }

    /// A request on request queue 1 with a single reply descriptor.
    pub fn request(&mut self, opcode: u32, nodeid: u64, body: &[u8], reply_cap: usize) -> Reply {
        self.request_split(1, opcode, nodeid, body, reply_cap, usize::MAX)
    }
}

fn pieces(total: usize, seg: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let mut off = 0;
    while off < total {
        let n = seg.min(total - off);
        v.push((off, n));
        off += n;
    }
    v
}
