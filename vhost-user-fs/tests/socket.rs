//! vhost-user-fs over its socket, driven by a mock virtio-fs frontend: config space, every
//! kind of operation, READDIRPLUS paging, big I/O across many descriptors, both request
//! queues, hostile chains and requests (answered, daemon keeps serving), escapes, reconnect.

mod frontend;

use std::path::PathBuf;
use std::process::Command;

use frontend::{Daemon, Desc, Session, DESC_NEXT, DESC_WRITE};
use vhost_user_fs::fuse::abi::{self, opcode as op, ROOT_ID};
use vm_memory::ByteValued;

struct Fx {
    _tmp: tempfile::TempDir,
    share: PathBuf,
    sock: PathBuf,
    daemon: Daemon,
}

fn start(extra: &[&str]) -> Fx {
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(tmp.path().join("secret"), b"outside").unwrap();
    let sock = tmp.path().join("fs.sock");
    let daemon = Daemon::spawn(
        Command::new(frontend::daemon_binary())
            .arg("--socket")
            .arg(&sock)
            .arg("--shared-dir")
            .arg(&share)
            .args([
                "--tag",
                "testtag",
                "--num-request-queues",
                "2",
                "--sandbox",
                "none",
                "--log-level",
                "error",
            ])
            .args(extra),
        &sock,
    );
    Fx {
        _tmp: tmp,
        share,
        sock,
        daemon,
    }
}

fn name(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn init(s: &mut Session) {
    let i = abi::InitIn {
        major: 7,
        minor: 38,
        max_readahead: 1 << 20,
        flags: u32::MAX,
    };
    let r = s.request(op::INIT, 0, i.as_slice(), 4096);
    assert_eq!(r.errno, 0);
    let out = abi::InitOut::from_slice(&r.data).unwrap();
    assert_eq!(out.max_write, 1 << 20);
}

fn create(s: &mut Session, parent: u64, n: &str) -> (u64, u64) {
    let c = abi::CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        open_flags: 0,
    };
    let r = s.request(op::CREATE, parent, &[c.as_slice(), &name(n)].concat(), 4096);
    assert_eq!(r.errno, 0, "create {n}");
    let e = abi::EntryOut::from_slice(&r.data[..128]).unwrap();
    let o = abi::OpenOut::from_slice(&r.data[128..]).unwrap();
    (e.nodeid, o.fh)
}

#[test]
fn config_space_has_tag_and_queue_count() {
    let fx = start(&[]);
    let mut s = Session::connect(&fx.sock, 3);
    let c = s.config(0, 40).unwrap();
    assert_eq!(&c[..7], b"testtag");
    assert!(c[7..36].iter().all(|&b| b == 0));
    assert_eq!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 2);
}

#[test]
fn operations_big_io_and_paging_over_both_queues() {
    let fx = start(&["--xattr"]);
    let mut s = Session::connect(&fx.sock, 3);
    init(&mut s);
    // MKDIR, CREATE, LOOKUP, GETATTR on request queue 2 as well.
    let m = abi::MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let r = s.request(
        op::MKDIR,
        ROOT_ID,
        &[m.as_slice(), &name("dir")].concat(),
        4096,
    );
    assert_eq!(r.errno, 0);
    let dir = abi::EntryOut::from_slice(&r.data).unwrap().nodeid;
    let r = s.request_split(2, op::LOOKUP, ROOT_ID, &name("dir"), 4096, usize::MAX);
    assert_eq!(
        (r.errno, abi::EntryOut::from_slice(&r.data).unwrap().nodeid),
        (0, dir)
    );
    let r = s.request_split(2, op::GETATTR, dir, &[0; 16], 4096, usize::MAX);
    assert_eq!(
        abi::AttrOut::from_slice(&r.data).unwrap().attr.mode & libc::S_IFMT,
        libc::S_IFDIR
    );

    // A 1 MiB write and read, each spread over 4 KiB descriptors (256+ per chain would
    // exceed the queue; 16 KiB pieces make 64).
    let (node, fh) = create(&mut s, dir, "big");
    let data: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let w = abi::WriteIn {
        fh,
        offset: 4096,
        size: data.len() as u32,
        ..Default::default()
    };
    let r = s.request_split(
        1,
        op::WRITE,
        node,
        &[w.as_slice(), &data].concat(),
        4096,
        16 << 10,
    );
    assert_eq!(r.errno, 0);
    assert_eq!(abi::WriteOut::from_slice(&r.data).unwrap().size, 1 << 20);
    assert_eq!(
        std::fs::read(fx.share.join("dir/big")).unwrap()[4096..],
        data[..]
    );
    let rd = abi::ReadIn {
        fh,
        offset: 4096,
        size: 1 << 20,
        ..Default::default()
    };
    let r = s.request_split(2, op::READ, node, rd.as_slice(), 16 + (1 << 20), 16 << 10);
    assert_eq!(r.errno, 0);
    assert_eq!(r.data, data);
    // A short reply buffer gets a short read, not an overflow.
    let r = s.request_split(1, op::READ, node, rd.as_slice(), 16 + 1000, 300);
    assert_eq!((r.errno, &r.data[..]), (0, &data[..1000]));

    // SETATTR, SYMLINK, READLINK, LINK, RENAME, SETXATTR/GETXATTR, STATFS, FSYNC, RELEASE.
    let sa = abi::SetattrIn {
        valid: abi::setattr_valid::MODE,
        mode: 0o600,
        ..Default::default()
    };
    assert_eq!(s.request(op::SETATTR, node, sa.as_slice(), 4096).errno, 0);
    let r = s.request(op::SYMLINK, dir, &[name("sl"), name("big")].concat(), 4096);
    let sl = abi::EntryOut::from_slice(&r.data).unwrap().nodeid;
    assert_eq!(s.request(op::READLINK, sl, &[], 4096).data, b"big");
    let l = abi::LinkIn { oldnodeid: node };
    assert_eq!(
        s.request(
            op::LINK,
            ROOT_ID,
            &[l.as_slice(), &name("hl")].concat(),
            4096
        )
        .errno,
        0
    );
    let rn = abi::RenameIn { newdir: ROOT_ID };
    assert_eq!(
        s.request(
            op::RENAME,
            dir,
            &[rn.as_slice(), &name("sl"), &name("sl2")].concat(),
            4096
        )
        .errno,
        0
    );
    assert!(fx.share.join("sl2").is_symlink());
    let sx = abi::SetxattrIn { size: 2, flags: 0 };
    let xr = s.request(
        op::SETXATTR,
        node,
        &[sx.as_slice(), &name("user.k"), b"v1"].concat(),
        4096,
    );
    if xr.errno == 0 {
        let gx = abi::GetxattrIn {
            size: 64,
            padding: 0,
        };
        assert_eq!(
            s.request(
                op::GETXATTR,
                node,
                &[gx.as_slice(), &name("user.k")].concat(),
                4096
            )
            .data,
            b"v1"
        );
    } else {
        assert_eq!(xr.errno, libc::EOPNOTSUPP, "setxattr");
    }
    assert_eq!(s.request(op::STATFS, ROOT_ID, &[], 4096).errno, 0);
    let fs = abi::FsyncIn {
        fh,
        ..Default::default()
    };
    assert_eq!(s.request(op::FSYNC, node, fs.as_slice(), 4096).errno, 0);
    let rel = abi::ReleaseIn {
        fh,
        ..Default::default()
    };
    assert_eq!(s.request(op::RELEASE, node, rel.as_slice(), 4096).errno, 0);

    // READDIRPLUS paging: 200 entries through 1 KiB replies, each entry exactly once.
    for i in 0..200 {
        std::fs::write(fx.share.join(format!("dir/entry-{i:03}")), b"").unwrap();
    }
    let r = s.request(op::OPENDIR, dir, abi::OpenIn::default().as_slice(), 4096);
    let dfh = abi::OpenOut::from_slice(&r.data).unwrap().fh;
    let mut seen = Vec::new();
    let mut offset = 0;
    let mut rounds = 0;
    loop {
        let rd = abi::ReadIn {
            fh: dfh,
            offset,
            size: 1024,
            ..Default::default()
        };
        let r = s.request(op::READDIRPLUS, dir, rd.as_slice(), 16 + 1024);
        assert_eq!(r.errno, 0);
        if r.data.is_empty() {
            break;
        }
        rounds += 1;
        let mut pos = 0;
        while pos < r.data.len() {
            let d = abi::Dirent::from_slice(&r.data[pos + 128..pos + 152]).unwrap();
            seen.push(
                String::from_utf8_lossy(&r.data[pos + 152..pos + 152 + d.namelen as usize])
                    .into_owned(),
            );
            offset = d.off;
            pos += 152 + ((d.namelen as usize + 7) & !7);
        }
    }
    seen.sort();
    let entries: Vec<_> = seen.iter().filter(|n| n.starts_with("entry-")).collect();
    assert_eq!(entries.len(), 200);
    assert!(rounds > 10, "paging used {rounds} rounds");
    assert!(seen.contains(&"big".to_string()) && seen.contains(&".".to_string()));

    // UNLINK, RMDIR, then FORGET on the hiprio queue (no reply: used length 0).
    assert_eq!(s.request(op::UNLINK, dir, &name("big"), 4096).errno, 0);
    let f = abi::ForgetIn { nlookup: 1 };
    let r = s.request_split(0, op::FORGET, sl, f.as_slice(), 0, usize::MAX);
    assert_eq!(r.used, 0);
    assert!(fx.share.join("hl").exists());
}

#[test]
fn hostile_chains_and_requests_are_answered_and_serving_continues() {
    let mut fx = start(&[]);
    let mut s = Session::connect(&fx.sock, 3);
    init(&mut s);
    // Unknown opcode, name without NUL, header length beyond the chain, reply too small.
    assert_eq!(s.request(9999, ROOT_ID, &[], 4096).errno, libc::ENOSYS);
    assert_eq!(
        s.request(op::LOOKUP, ROOT_ID, b"noterminator", 4096).errno,
        libc::EINVAL
    );
    assert_eq!(
        s.request(op::STATFS, ROOT_ID, &[], 20).errno,
        libc::EOVERFLOW
    );
    assert_eq!(s.request(op::STATFS, ROOT_ID, &[], 8).used, 0);
    // LOOKUP of "..": never resolves.
    assert_ne!(s.request(op::LOOKUP, ROOT_ID, &name(".."), 4096).errno, 0);

    let req = s.guest.alloc(4096);
    let reply = s.guest.alloc(4096);
    let lying = abi::InHeader {
        len: 100_000,
        opcode: op::GETATTR,
        unique: 5,
        nodeid: ROOT_ID,
        ..Default::default()
    };
    s.guest.write(req, lying.as_slice());
    // Claimed length larger than the chain: EINVAL reply.
    let used = s.run_chain(1, &[Desc::readable(req, 56), Desc::writable(reply, 64)]);
    assert_eq!(used, 16);
    let oh: abi::OutHeader = s.guest.read_obj(reply);
    assert_eq!((oh.error, oh.unique), (-libc::EINVAL, 5));
    // Header shorter than 40 bytes.
    let used = s.run_chain(1, &[Desc::readable(req, 10), Desc::writable(reply, 64)]);
    assert_eq!(used, 16);
    // Readable after writable: returned with nothing written.
    let used = s.run_chain(1, &[Desc::writable(reply, 64), Desc::readable(req, 56)]);
    assert_eq!(used, 0);
    // Buffers outside guest memory.
    let used = s.run_chain(1, &[Desc::readable(1 << 40, 56), Desc::writable(reply, 64)]);
    assert_eq!(used, 16);
    let used = s.run_chain(
        1,
        &[Desc::readable(req, 56), Desc::writable(u64::MAX - 8, 64)],
    );
    assert_eq!(used, 0);
    // A looping chain (descriptor 101 points back to 100).
    let mem = s.guest.mem().clone();
    s.queues[1].write_desc(&mem, 100, req, 56, DESC_NEXT, 101);
    s.queues[1].write_desc(&mem, 101, reply, 64, DESC_WRITE | DESC_NEXT, 100);
    s.queues[1].publish(&mem, 100);
    let _ = s.wait_or_disconnect(1, std::time::Duration::from_secs(20));

    // Still serving, on both request queues.
    for q in [1, 2] {
        let r = s.request_split(q, op::GETATTR, ROOT_ID, &[0; 16], 4096, usize::MAX);
        assert_eq!(r.errno, 0, "queue {q} after hostile input");
    }
    assert!(fx.daemon.alive());
}

#[test]
fn escapes_and_device_nodes_are_denied() {
    let fx = start(&[]);
    let mut s = Session::connect(&fx.sock, 2);
    init(&mut s);
    let outside = fx.share.parent().unwrap().join("secret");
    std::os::unix::fs::symlink(&outside, fx.share.join("abs")).unwrap();
    std::os::unix::fs::symlink("../secret", fx.share.join("rel")).unwrap();
    for link in ["abs", "rel"] {
        let r = s.request(op::LOOKUP, ROOT_ID, &name(link), 4096);
        let node = abi::EntryOut::from_slice(&r.data).unwrap().nodeid;
        let o = abi::OpenIn {
            flags: libc::O_RDONLY as u32,
            open_flags: 0,
        };
        assert_eq!(
            s.request(op::OPEN, node, o.as_slice(), 4096).errno,
            libc::ELOOP,
            "{link}"
        );
    }
    for bad in ["../secret", "/etc/passwd", "..", "/proc/self/fd/1"] {
        assert_ne!(
            s.request(op::LOOKUP, ROOT_ID, &name(bad), 4096).errno,
            0,
            "{bad}"
        );
    }
    let m = abi::MknodIn {
        mode: libc::S_IFBLK | 0o600,
        rdev: 8 << 8,
        ..Default::default()
    };
    assert_eq!(
        s.request(
            op::MKNOD,
            ROOT_ID,
            &[m.as_slice(), &name("sda")].concat(),
            4096
        )
        .errno,
        libc::EPERM
    );
    assert_eq!(std::fs::read(&outside).unwrap(), b"outside");
}

#[test]
fn next_frontend_gets_a_fresh_session() {
    let fx = start(&[]);
    {
        let mut s = Session::connect(&fx.sock, 3);
        init(&mut s);
        create(&mut s, ROOT_ID, "kept");
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut s = Session::connect(&fx.sock, 3);
    // A new session must INIT first.
    assert_eq!(
        s.request(op::GETATTR, ROOT_ID, &[0; 16], 4096).errno,
        libc::EIO
    );
    init(&mut s);
    assert_eq!(s.request(op::LOOKUP, ROOT_ID, &name("kept"), 4096).errno, 0);
}
