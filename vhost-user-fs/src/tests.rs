//! Every FUSE operation through the dispatcher on a temporary directory, with the error codes
//! a guest would see, and escape attempts.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use vm_memory::ByteValued;

use crate::fuse::abi::{self, opcode as op, InHeader, OutHeader, ROOT_ID};
use crate::fuse::{SlicePayload, VecSink};
use crate::passthrough::{FsConfig, PassthroughFs};
use crate::server::Server;

struct Fixture {
    _tmp: tempfile::TempDir,
    /// The shared directory (`<tmp>/share`); `<tmp>/outside` is a sibling the guest must not reach.
    share: std::path::PathBuf,
    outside: std::path::PathBuf,
    server: Server,
}

fn fixture_with(f: impl FnOnce(&mut FsConfig)) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&share).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"host secret").unwrap();
    let mut cfg = FsConfig::new(share.clone());
    cfg.xattr = true;
    f(&mut cfg);
    let server = Server::new(PassthroughFs::new(cfg).unwrap());
    let fx = Fixture {
        _tmp: tmp,
        share,
        outside,
        server,
    };
    let mut init = abi::InitIn {
        major: 7,
        minor: 38,
        max_readahead: 65536,
        flags: u32::MAX,
    }
    .as_slice()
    .to_vec();
    init.extend_from_slice(&[0; 48]);
    let (err, _) = fx.call(op::INIT, 0, &init);
    assert_eq!(err, 0);
    fx
}

fn fixture() -> Fixture {
    fixture_with(|_| {})
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn name(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

impl Fixture {
    /// Send a request; returns (errno, reply payload). errno is positive.
    fn call(&self, opcode: u32, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
        self.call_cap(opcode, nodeid, body, 1 << 21)
    }

    fn call_cap(&self, opcode: u32, nodeid: u64, body: &[u8], cap: usize) -> (i32, Vec<u8>) {
        self.call_as((0, 0), opcode, nodeid, body, cap)
    }

    /// A request from guest user `uid:gid`.
    fn call_as(
        &self,
        (uid, gid): (u32, u32),
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        cap: usize,
    ) -> (i32, Vec<u8>) {
        let h = InHeader {
            len: (40 + body.len()) as u32,
            opcode,
            unique: 77,
            nodeid,
            uid,
            gid,
            ..Default::default()
        };
        let (body, payload) = if opcode == op::WRITE && body.len() >= 40 {
            body.split_at(40)
        } else {
            (body, &[][..])
        };
        let mut sink = VecSink::new(cap);
        let n = self
            .server
            .handle(&h, body, &mut SlicePayload(payload), &mut sink);
        if n == 0 {
            return (-1, Vec::new());
        }
        let out = OutHeader::from_slice(&sink.buf[..16]).copied().unwrap();
        assert_eq!(out.unique, 77);
        assert_eq!(out.len as usize, n);
        (-out.error, sink.buf[16..n].to_vec())
    }

    fn lookup(&self, parent: u64, n: &str) -> Result<abi::EntryOut, i32> {
        match self.call(op::LOOKUP, parent, &name(n)) {
            (0, d) => Ok(*abi::EntryOut::from_slice(&d).unwrap()),
            (e, _) => Err(e),
        }
    }

    fn create(&self, parent: u64, n: &str) -> (abi::EntryOut, u64) {
        let body = cat(&[
            abi::CreateIn {
                flags: libc::O_RDWR as u32,
                mode: libc::S_IFREG | 0o644,
                umask: 0,
                open_flags: 0,
            }
            .as_slice(),
            &name(n),
        ]);
        let (e, d) = self.call(op::CREATE, parent, &body);
        assert_eq!(e, 0, "create {n}");
        let entry = *abi::EntryOut::from_slice(&d[..128]).unwrap();
        let open = *abi::OpenOut::from_slice(&d[128..]).unwrap();
        (entry, open.fh)
    }

    fn write(&self, fh: u64, offset: u64, data: &[u8]) -> (i32, Vec<u8>) {
        let w = abi::WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            ..Default::default()
        };
        self.call(op::WRITE, 0, &cat(&[w.as_slice(), data]))
    }

    fn read(&self, fh: u64, offset: u64, size: u32) -> (i32, Vec<u8>) {
        let r = abi::ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        self.call(op::READ, 0, r.as_slice())
    }

    fn open(&self, node: u64, flags: i32) -> Result<u64, i32> {
        let o = abi::OpenIn {
            flags: flags as u32,
            open_flags: 0,
        };
        match self.call(op::OPEN, node, o.as_slice()) {
            (0, d) => Ok(abi::OpenOut::from_slice(&d).unwrap().fh),
            (e, _) => Err(e),
        }
    }

    fn mkdir(&self, parent: u64, n: &str) -> Result<abi::EntryOut, i32> {
        let body = cat(&[
            abi::MkdirIn {
                mode: 0o755,
                umask: 0,
            }
            .as_slice(),
            &name(n),
        ]);
        match self.call(op::MKDIR, parent, &body) {
            (0, d) => Ok(*abi::EntryOut::from_slice(&d).unwrap()),
            (e, _) => Err(e),
        }
    }

    fn symlink(&self, parent: u64, n: &str, target: &str) -> Result<abi::EntryOut, i32> {
        match self.call(op::SYMLINK, parent, &cat(&[&name(n), &name(target)])) {
            (0, d) => Ok(*abi::EntryOut::from_slice(&d).unwrap()),
            (e, _) => Err(e),
        }
    }

    fn readdir(&self, node: u64, plus: bool, size: u32) -> Vec<(String, u64)> {
        let (e, d) = self.call(op::OPENDIR, node, abi::OpenIn::default().as_slice());
        assert_eq!(e, 0);
        let fh = abi::OpenOut::from_slice(&d).unwrap().fh;
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let r = abi::ReadIn {
                fh,
                offset,
                size,
                ..Default::default()
            };
            let opc = if plus { op::READDIRPLUS } else { op::READDIR };
            let (e, d) = self.call(opc, node, r.as_slice());
            assert_eq!(e, 0);
            if d.is_empty() {
                break;
            }
            let mut pos = 0;
            while pos < d.len() {
                let mut nodeid = 0;
                if plus {
                    nodeid = abi::EntryOut::from_slice(&d[pos..pos + 128])
                        .unwrap()
                        .nodeid;
                    pos += 128;
                }
                let de = *abi::Dirent::from_slice(&d[pos..pos + 24]).unwrap();
                let n = &d[pos + 24..pos + 24 + de.namelen as usize];
                names.push((String::from_utf8_lossy(n).into_owned(), nodeid));
                offset = de.off;
                pos += 24 + ((de.namelen as usize + 7) & !7);
            }
        }
        let rel = abi::ReleaseIn {
            fh,
            ..Default::default()
        };
        assert_eq!(self.call(op::RELEASEDIR, node, rel.as_slice()).0, 0);
        names.sort();
        names
    }
}

#[test]
fn requests_before_init_fail_and_init_negotiates() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::new(PassthroughFs::new(FsConfig::new(tmp.path().into())).unwrap());
    let h = InHeader {
        len: 40,
        opcode: op::GETATTR,
        unique: 1,
        nodeid: ROOT_ID,
        ..Default::default()
    };
    let mut sink = VecSink::new(4096);
    server.handle(&h, &[0; 16], &mut SlicePayload(&[]), &mut sink);
    assert_eq!(
        OutHeader::from_slice(&sink.buf[..16]).unwrap().error,
        -libc::EIO
    );

    let fx = fixture();
    let init = abi::InitIn {
        major: 7,
        minor: 31,
        max_readahead: 4096,
        flags: (abi::init_flags::DO_READDIRPLUS | abi::init_flags::MAP_ALIGNMENT) as u32,
    };
    let (e, d) = fx.call(op::INIT, 0, init.as_slice());
    assert_eq!(e, 0);
    let out = abi::InitOut::from_slice(&d).unwrap();
    assert_eq!((out.major, out.minor), (7, 31));
    assert_eq!(out.flags as u64, abi::init_flags::DO_READDIRPLUS);
    assert_eq!(out.max_write, 1 << 20);
    assert_eq!(out.map_alignment, 0);
    let old = abi::InitIn {
        major: 6,
        ..Default::default()
    };
    assert_eq!(fx.call(op::INIT, 0, old.as_slice()).0, libc::EPROTO);
}

#[test]
fn create_answers_with_the_inode_it_opened() {
    let fx = fixture();
    let (entry, fh) = fx.create(ROOT_ID, "f");
    assert_eq!(fx.lookup(ROOT_ID, "f").unwrap().nodeid, entry.nodeid);
    // CREATE of an existing name (no O_EXCL) opens it and counts a lookup of the same node.
    let (again, fh2) = fx.create(ROOT_ID, "f");
    assert_eq!(again.nodeid, entry.nodeid);
    assert_ne!(fh2, fh);
    assert_eq!(fx.write(fh2, 0, b"abc").0, 0);
    let (e, d) = fx.call(
        op::GETATTR,
        entry.nodeid,
        abi::GetattrIn::default().as_slice(),
    );
    assert_eq!(e, 0);
    assert_eq!(abi::AttrOut::from_slice(&d).unwrap().attr.size, 3);

    // As root, a new file belongs to the guest user who created it, and the reply says so.
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let body = cat(&[
            abi::CreateIn {
                flags: libc::O_WRONLY as u32,
                mode: libc::S_IFREG | 0o600,
                umask: 0,
                open_flags: 0,
            }
            .as_slice(),
            &name("owned"),
        ]);
        let (e, d) = fx.call_as((1234, 4321), op::CREATE, ROOT_ID, &body, 4096);
        assert_eq!(e, 0);
        let entry = abi::EntryOut::from_slice(&d[..128]).unwrap();
        assert_eq!((entry.attr.uid, entry.attr.gid), (1234, 4321));
        let md = std::fs::metadata(fx.share.join("owned")).unwrap();
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (1234, 4321, 0o600)
        );
    }
}

#[test]
fn names_up_to_255_bytes() {
    let fx = fixture();
    let longest = "n".repeat(255);
    let (entry, _) = fx.create(ROOT_ID, &longest);
    assert_eq!(fx.lookup(ROOT_ID, &longest).unwrap().nodeid, entry.nodeid);
    assert!(fx.share.join(&longest).is_file());
    let too_long = "n".repeat(256);
    assert_eq!(
        fx.lookup(ROOT_ID, &too_long).unwrap_err(),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        fx.mkdir(ROOT_ID, &too_long).unwrap_err(),
        libc::ENAMETOOLONG
    );
}

#[test]
fn file_lifecycle_create_write_read_setattr_rename_unlink() {
    let fx = fixture();
    let (entry, fh) = fx.create(ROOT_ID, "f");
    assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFREG);
    let (e, d) = fx.write(fh, 0, b"hello world");
    assert_eq!(e, 0);
    assert_eq!(abi::WriteOut::from_slice(&d).unwrap().size, 11);
    assert_eq!(fx.read(fh, 6, 100), (0, b"world".to_vec()));
    assert_eq!(std::fs::read(fx.share.join("f")).unwrap(), b"hello world");

    // GETATTR, SETATTR (mode, size, times).
    let (e, d) = fx.call(
        op::GETATTR,
        entry.nodeid,
        abi::GetattrIn::default().as_slice(),
    );
    assert_eq!(e, 0);
    assert_eq!(abi::AttrOut::from_slice(&d).unwrap().attr.size, 11);
    let s = abi::SetattrIn {
        valid: abi::setattr_valid::MODE | abi::setattr_valid::SIZE | abi::setattr_valid::MTIME,
        mode: 0o600,
        size: 5,
        mtime: 1_000_000,
        ..Default::default()
    };
    let (e, d) = fx.call(op::SETATTR, entry.nodeid, s.as_slice());
    assert_eq!(e, 0);
    let attr = abi::AttrOut::from_slice(&d).unwrap().attr;
    assert_eq!(
        (attr.mode & 0o7777, attr.size, attr.mtime),
        (0o600, 5, 1_000_000)
    );
    let md = std::fs::metadata(fx.share.join("f")).unwrap();
    assert_eq!((md.permissions().mode() & 0o7777, md.len()), (0o600, 5));

    // FLUSH, FSYNC, FALLOCATE, LSEEK.
    let fl = abi::FlushIn {
        fh,
        ..Default::default()
    };
    assert_eq!(fx.call(op::FLUSH, entry.nodeid, fl.as_slice()).0, 0);
    let fs = abi::FsyncIn {
        fh,
        ..Default::default()
    };
    assert_eq!(fx.call(op::FSYNC, entry.nodeid, fs.as_slice()).0, 0);
    let fa = abi::FallocateIn {
        fh,
        offset: 0,
        length: 8192,
        ..Default::default()
    };
    assert_eq!(fx.call(op::FALLOCATE, entry.nodeid, fa.as_slice()).0, 0);
    assert_eq!(std::fs::metadata(fx.share.join("f")).unwrap().len(), 8192);
    let ls = abi::LseekIn {
        fh,
        offset: 0,
        whence: libc::SEEK_END as u32,
        ..Default::default()
    };
    let (e, d) = fx.call(op::LSEEK, entry.nodeid, ls.as_slice());
    assert_eq!(e, 0);
    assert_eq!(abi::LseekOut::from_slice(&d).unwrap().offset, 8192);

    // COPY_FILE_RANGE into a second file.
    let (_e2, fh2) = fx.create(ROOT_ID, "g");
    let c = abi::CopyFileRangeIn {
        fh_in: fh,
        off_in: 0,
        fh_out: fh2,
        off_out: 0,
        len: 5,
        ..Default::default()
    };
    let (e, d) = fx.call(op::COPY_FILE_RANGE, entry.nodeid, c.as_slice());
    assert_eq!(e, 0);
    assert_eq!(abi::WriteOut::from_slice(&d).unwrap().size, 5);
    assert_eq!(std::fs::read(fx.share.join("g")).unwrap(), b"hello");

    // RENAME, RENAME2 with NOREPLACE onto an existing name.
    let r = cat(&[
        abi::RenameIn { newdir: ROOT_ID }.as_slice(),
        &name("f"),
        &name("h"),
    ]);
    assert_eq!(fx.call(op::RENAME, ROOT_ID, &r).0, 0);
    assert!(fx.share.join("h").exists() && !fx.share.join("f").exists());
    let r2 = cat(&[
        abi::Rename2In {
            newdir: ROOT_ID,
            flags: libc::RENAME_NOREPLACE,
            padding: 0,
        }
        .as_slice(),
        &name("g"),
        &name("h"),
    ]);
    assert_eq!(fx.call(op::RENAME2, ROOT_ID, &r2).0, libc::EEXIST);

    // RELEASE, then the handle is gone.
    let rel = abi::ReleaseIn {
        fh,
        ..Default::default()
    };
    assert_eq!(fx.call(op::RELEASE, entry.nodeid, rel.as_slice()).0, 0);
    assert_eq!(fx.read(fh, 0, 10).0, libc::EBADF);

    // UNLINK; a second unlink is ENOENT.
    assert_eq!(fx.call(op::UNLINK, ROOT_ID, &name("h")).0, 0);
    assert_eq!(fx.call(op::UNLINK, ROOT_ID, &name("h")).0, libc::ENOENT);
    assert_eq!(fx.lookup(ROOT_ID, "h").unwrap_err(), libc::ENOENT);
}

#[test]
fn directories_links_symlinks_nodes_and_readdir_paging() {
    let fx = fixture();
    let d = fx.mkdir(ROOT_ID, "d").unwrap();
    assert_eq!(fx.mkdir(ROOT_ID, "d").unwrap_err(), libc::EEXIST);
    for i in 0..300 {
        fx.create(d.nodeid, &format!("file-with-a-longish-name-{i:04}"));
    }
    // Small reply buffers force many READDIR/READDIRPLUS rounds; every entry comes once.
    let plain = fx.readdir(d.nodeid, false, 512);
    assert_eq!(plain.len(), 302);
    let plus = fx.readdir(d.nodeid, true, 1000);
    assert_eq!(plus.len(), 302);
    assert!(plus
        .iter()
        .filter(|(n, _)| n.starts_with("file"))
        .all(|(_, id)| *id != 0));

    // Hard link, symlink, READLINK, FIFO via MKNOD.
    let (f, _) = fx.create(ROOT_ID, "orig");
    let l = cat(&[
        abi::LinkIn {
            oldnodeid: f.nodeid,
        }
        .as_slice(),
        &name("hard"),
    ]);
    let (e, out) = fx.call(op::LINK, d.nodeid, &l);
    assert_eq!(e, 0);
    assert_eq!(abi::EntryOut::from_slice(&out).unwrap().attr.nlink, 2);
    assert_eq!(
        std::fs::metadata(fx.share.join("d/hard")).unwrap().ino(),
        std::fs::metadata(fx.share.join("orig")).unwrap().ino()
    );
    let s = fx.symlink(ROOT_ID, "sl", "d/hard").unwrap();
    assert_eq!(
        fx.call(op::READLINK, s.nodeid, &[]),
        (0, b"d/hard".to_vec())
    );
    let m = cat(&[
        abi::MknodIn {
            mode: libc::S_IFIFO | 0o644,
            ..Default::default()
        }
        .as_slice(),
        &name("fifo"),
    ]);
    assert_eq!(fx.call(op::MKNOD, ROOT_ID, &m).0, 0);

    // RMDIR of a non-empty directory fails; after emptying it works.
    assert_eq!(fx.call(op::RMDIR, ROOT_ID, &name("d")).0, libc::ENOTEMPTY);
    std::fs::remove_dir_all(fx.share.join("d")).unwrap();
    std::fs::create_dir(fx.share.join("d")).unwrap();
    assert_eq!(fx.call(op::RMDIR, ROOT_ID, &name("d")).0, 0);

    // STATFS, ACCESS, FSYNCDIR, SYNCFS.
    let (e, out) = fx.call(op::STATFS, ROOT_ID, &[]);
    assert_eq!(e, 0);
    assert!(abi::Kstatfs::from_slice(&out).unwrap().bsize > 0);
    let a = abi::AccessIn {
        mask: libc::R_OK as u32,
        padding: 0,
    };
    assert_eq!(fx.call(op::ACCESS, ROOT_ID, a.as_slice()).0, 0);
    assert_eq!(fx.call(op::SYNCFS, ROOT_ID, &[0; 8]).0, 0);
}

#[test]
fn xattrs_round_trip() {
    let fx = fixture();
    let (f, _) = fx.create(ROOT_ID, "x");
    let body = cat(&[
        abi::SetxattrIn { size: 3, flags: 0 }.as_slice(),
        &name("user.color"),
        b"red",
    ]);
    let e = fx.call(op::SETXATTR, f.nodeid, &body).0;
    if e == libc::EOPNOTSUPP {
        eprintln!("skipping: the temp filesystem has no user xattrs");
        return;
    }
    assert_eq!(e, 0);
    let probe = cat(&[
        abi::GetxattrIn {
            size: 0,
            padding: 0,
        }
        .as_slice(),
        &name("user.color"),
    ]);
    let (e, d) = fx.call(op::GETXATTR, f.nodeid, &probe);
    assert_eq!(e, 0);
    assert_eq!(abi::GetxattrOut::from_slice(&d).unwrap().size, 3);
    let get = cat(&[
        abi::GetxattrIn {
            size: 64,
            padding: 0,
        }
        .as_slice(),
        &name("user.color"),
    ]);
    assert_eq!(fx.call(op::GETXATTR, f.nodeid, &get), (0, b"red".to_vec()));
    let small = cat(&[
        abi::GetxattrIn {
            size: 1,
            padding: 0,
        }
        .as_slice(),
        &name("user.color"),
    ]);
    assert_eq!(fx.call(op::GETXATTR, f.nodeid, &small).0, libc::ERANGE);
    let (e, d) = fx.call(
        op::LISTXATTR,
        f.nodeid,
        abi::GetxattrIn {
            size: 64,
            padding: 0,
        }
        .as_slice(),
    );
    assert_eq!(e, 0);
    assert!(d.windows(11).any(|w| w == b"user.color\0"));
    assert_eq!(fx.call(op::REMOVEXATTR, f.nodeid, &name("user.color")).0, 0);
    assert_eq!(fx.call(op::GETXATTR, f.nodeid, &get).0, libc::ENODATA);
}

#[test]
fn escapes_are_denied() {
    let fx = fixture();
    // `..` (and other multi-component or special names) never resolve.
    for bad in ["..", ".", "../outside", "/etc", "a/b", "/proc/self/fd/0"] {
        assert!(fx.lookup(ROOT_ID, bad).is_err(), "lookup {bad:?} must fail");
    }
    assert_eq!(fx.mkdir(ROOT_ID, "..").unwrap_err(), libc::EINVAL);
    // Symlinks pointing out are stored as text and never followed by the daemon.
    for (n, target) in [("abs", "/etc/passwd"), ("rel", "../outside/secret")] {
        let s = fx.symlink(ROOT_ID, n, target).unwrap();
        assert_eq!(s.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(fx.open(s.nodeid, libc::O_RDONLY).unwrap_err(), libc::ELOOP);
        // A symlink as a directory: lookups below it fail.
        assert!(fx.lookup(s.nodeid, "secret").is_err());
    }
    // A host-made symlink to the outside behaves the same.
    std::os::unix::fs::symlink(&fx.outside, fx.share.join("hostlink")).unwrap();
    let hl = fx.lookup(ROOT_ID, "hostlink").unwrap();
    assert!(fx.lookup(hl.nodeid, "secret").is_err());
    let o = abi::OpenIn::default();
    assert_ne!(fx.call(op::OPENDIR, hl.nodeid, o.as_slice()).0, 0);
    // Device nodes cannot be created by default.
    let m = cat(&[
        abi::MknodIn {
            mode: libc::S_IFCHR | 0o666,
            rdev: (1 << 8) | 3,
            ..Default::default()
        }
        .as_slice(),
        &name("null"),
    ]);
    assert_eq!(fx.call(op::MKNOD, ROOT_ID, &m).0, libc::EPERM);
    assert!(!fx.share.join("null").exists());
    // Hard links can only name inodes the guest already holds: unknown node ids fail.
    let l = cat(&[
        abi::LinkIn { oldnodeid: 999_999 }.as_slice(),
        &name("stolen"),
    ]);
    assert_eq!(fx.call(op::LINK, ROOT_ID, &l).0, libc::EBADF);
    assert!(!fx.share.join("stolen").exists());
    assert_eq!(
        std::fs::read(fx.outside.join("secret")).unwrap(),
        b"host secret"
    );
}

#[test]
fn readonly_refuses_changes() {
    let fx = fixture_with(|c| c.readonly = true);
    std::fs::write(fx.share.join("ro"), b"data").unwrap();
    let f = fx.lookup(ROOT_ID, "ro").unwrap();
    assert_eq!(fx.mkdir(ROOT_ID, "d").unwrap_err(), libc::EROFS);
    assert_eq!(fx.open(f.nodeid, libc::O_RDWR).unwrap_err(), libc::EROFS);
    let fh = fx.open(f.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(fx.read(fh, 0, 10), (0, b"data".to_vec()));
    assert_eq!(fx.write(fh, 0, b"x").0, libc::EROFS);
    assert_eq!(fx.call(op::UNLINK, ROOT_ID, &name("ro")).0, libc::EROFS);
}

#[test]
fn hostile_requests_get_errors() {
    let fx = fixture();
    // Unknown opcodes.
    for opc in [0, 7, 31, 39, 48, 51, 52, 999, u32::MAX] {
        assert_eq!(fx.call(opc, ROOT_ID, &[]).0, libc::ENOSYS, "opcode {opc}");
    }
    // Truncated bodies and names without NUL.
    assert_eq!(fx.call(op::LOOKUP, ROOT_ID, b"noterm").0, libc::EINVAL);
    assert_eq!(fx.call(op::SETATTR, ROOT_ID, &[0; 10]).0, libc::EINVAL);
    assert_eq!(fx.call(op::MKDIR, ROOT_ID, &[0; 3]).0, libc::EINVAL);
    let sx = cat(&[
        abi::SetxattrIn {
            size: 1000,
            flags: 0,
        }
        .as_slice(),
        &name("user.a"),
        b"x",
    ]);
    assert_eq!(fx.call(op::SETXATTR, ROOT_ID, &sx).0, libc::EINVAL);
    // Unknown node ids and handles.
    assert_eq!(fx.call(op::GETATTR, 12345, &[0; 16]).0, libc::EBADF);
    assert_eq!(fx.read(4242, 0, 10).0, libc::EBADF);
    // WRITE claiming more data than it carries.
    let (_, fh) = fx.create(ROOT_ID, "w");
    let w = abi::WriteIn {
        fh,
        size: 100,
        ..Default::default()
    };
    assert_eq!(
        fx.call(op::WRITE, 0, &cat(&[w.as_slice(), b"abc"])).0,
        libc::EINVAL
    );
    // A reply buffer too small for the answer gets an error; none at all gets no reply.
    assert_eq!(fx.call_cap(op::STATFS, ROOT_ID, &[], 20).0, libc::EOVERFLOW);
    assert_eq!(fx.call_cap(op::STATFS, ROOT_ID, &[], 8).0, -1);
    // BATCH_FORGET with a count larger than its body is bounded by the body.
    let bf = abi::BatchForgetIn {
        count: u32::MAX,
        dummy: 0,
    };
    assert_eq!(fx.call(op::BATCH_FORGET, 0, bf.as_slice()).0, -1);
    // Still serving.
    assert!(fx.lookup(ROOT_ID, "w").is_ok());
}

#[test]
fn forget_releases_inodes_and_descriptors() {
    let fx = fixture();
    std::fs::write(fx.share.join("a"), b"").unwrap();
    // Descriptors of this process that point into this fixture's directory (tests run in
    // parallel, so the process-wide count moves).
    let fds = || {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t.starts_with(&fx.share))
            .count()
    };
    let base_inodes = fx.server.fs().inode_count();
    let e = fx.lookup(ROOT_ID, "a").unwrap();
    let before = fds();
    for _ in 0..10_000 {
        assert_eq!(fx.lookup(ROOT_ID, "a").unwrap().nodeid, e.nodeid);
    }
    assert_eq!(fds(), before, "repeated lookups must not keep descriptors");
    assert_eq!(fx.server.fs().inode_count(), base_inodes + 1);
    let f = abi::ForgetIn { nlookup: 10_001 };
    assert_eq!(fx.call(op::FORGET, e.nodeid, f.as_slice()).0, -1);
    assert_eq!(fx.server.fs().inode_count(), base_inodes);
    assert_eq!(fx.call(op::GETATTR, e.nodeid, &[0; 16]).0, libc::EBADF);
    // BATCH_FORGET.
    let ids: Vec<u64> = (0..50)
        .map(|i| {
            std::fs::write(fx.share.join(format!("b{i}")), b"").unwrap();
            fx.lookup(ROOT_ID, &format!("b{i}")).unwrap().nodeid
        })
        .collect();
    assert_eq!(fx.server.fs().inode_count(), base_inodes + 50);
    let mut body = abi::BatchForgetIn {
        count: 50,
        dummy: 0,
    }
    .as_slice()
    .to_vec();
    for id in ids {
        body.extend_from_slice(
            abi::ForgetOne {
                nodeid: id,
                nlookup: 1,
            }
            .as_slice(),
        );
    }
    fx.call(op::BATCH_FORGET, 0, &body);
    assert_eq!(fx.server.fs().inode_count(), base_inodes);
}

#[test]
fn inode_table_is_bounded() {
    let fx = fixture_with(|c| c.max_inodes = 4);
    for i in 0..5 {
        std::fs::write(fx.share.join(format!("f{i}")), b"").unwrap();
    }
    let mut errs = Vec::new();
    for i in 0..5 {
        if let Err(e) = fx.lookup(ROOT_ID, &format!("f{i}")) {
            errs.push(e);
        }
    }
    assert_eq!(errs, vec![libc::ENFILE, libc::ENFILE]);
    assert!(Path::new(&fx.share).exists());
}

#[test]
fn destroy_drops_session_state() {
    let fx = fixture();
    let (_, fh) = fx.create(ROOT_ID, "f");
    assert_eq!(fx.call(op::DESTROY, 0, &[]).0, 0);
    assert_eq!(fx.server.fs().inode_count(), 1);
    assert_eq!(fx.server.fs().handle_count(), 0);
    // Not initialized any more.
    assert_eq!(fx.read(fh, 0, 1).0, libc::EIO);
}
