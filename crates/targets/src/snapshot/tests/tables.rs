//! The targets built from tables: parameters, claims, the shared origin, reloads.

use std::path::Path;

use dmrep_core::{BuildContext, DeviceRegistry, Target};
use dmrep_formats::table::SegmentSpec;

use super::*;
use crate::snapshot::origin_for_file;

fn seg(target: &str, len: u64, args: &[&str]) -> SegmentSpec {
    SegmentSpec {
        start: 0,
        len,
        target: target.to_string(),
        args: args.iter().map(|s| s.to_string()).collect(),
        line: 0,
    }
}

fn build(reg: &DeviceRegistry, dev: &str, s: SegmentSpec) -> Result<Arc<dyn Target>, dmrep_core::TargetError> {
    crate::registry().build(&BuildContext::new(dev, reg), &s)
}

fn file(dir: &Path, name: &str, len: u64) -> String {
    let p = dir.join(name);
    std::fs::write(&p, vec![0u8; len as usize]).unwrap();
    p.to_str().unwrap().to_string()
}

fn io(t: &Arc<dyn Target>, op: dmrep_core::Op, off: u64, buf: Vec<u8>) -> io::Result<Vec<u8>> {
    use dmrep_core::device::WaitSink;
    let sink = Arc::new(WaitSink::default());
    let len = buf.len() as u64;
    t.submit(dmrep_core::Request::new(op, off, len, buf, 0), dmrep_core::Completion::new(sink.clone(), 0));
    let (req, r) = sink.wait();
    r.map(|()| req.buf)
}

#[test]
fn origin_and_snapshot_tables_share_the_file_origin_and_guard_their_devices() {
    let dir = tempfile::tempdir().unwrap();
    let reg = DeviceRegistry::new();
    let base = file(dir.path(), "base", 1 << 20);
    std::fs::write(&base, vec![0x11u8; 1 << 20]).unwrap();
    let cow = file(dir.path(), "cow", 1 << 20);
    let snap = build(&reg, "s", seg("snapshot", 2048, &[&base, &cow, "P", "8"])).unwrap();
    let org = build(&reg, "o", seg("snapshot-origin", 2048, &[&base])).unwrap();
    io(&org, dmrep_core::Op::Write { fua: false }, 4096, vec![0x22; 8192]).unwrap();
    assert_eq!(io(&snap, dmrep_core::Op::Read, 4096, vec![0; 8192]).unwrap(), vec![0x11; 8192]);
    // Another writer of the file through the registry copies out too.
    let other = origin_for_file(Path::new(&base)).unwrap();
    other.write_at(&[0x33; 512], 0).unwrap();
    assert_eq!(io(&snap, dmrep_core::Op::Read, 0, vec![0; 512]).unwrap(), vec![0x11; 512]);
    assert_eq!(other.snapshots().len(), 1);
    assert_eq!(org.status().line, format!("1 {cow}"));
    assert_eq!(snap.status().line, "40/2048 16", "header, metadata chunk, 3 data chunks of 8 sectors");
    assert_eq!(snap.status().json["origin"], base);

    // Claims: a second snapshot on the same COW, a snapshot whose COW is the origin, a
    // linear table over the origin: all refused, naming what is in the way.
    let e = build(&reg, "s2", seg("snapshot", 2048, &[&base, &cow, "P", "8"])).err().unwrap().to_string();
    assert!(e.contains(&cow) && e.contains("device s (COW device of snapshot"), "{e}");
    let e = build(&reg, "s3", seg("snapshot", 2048, &[&base, &base, "P", "8"])).err().unwrap().to_string();
    assert!(e.contains("snapshot origin"), "{e}");
    let e = build(&reg, "l", seg("linear", 8, &[&base, "0"])).err().unwrap().to_string();
    assert!(e.contains("device o (snapshot origin"), "{e}");
    let e = build(&reg, "s4", seg("snapshot", 4096, &[&base, &cow, "P", "8"])).err().unwrap().to_string();
    assert!(e.contains("past the end"), "{e}");
    for (args, want) in [
        (vec![base.as_str(), cow.as_str(), "X", "8"], "expected P (persistent) or N"),
        (vec![base.as_str(), cow.as_str(), "P", "6"], "power of two"),
        (vec![base.as_str(), cow.as_str(), "P"], "expected 4 parameters"),
    ] {
        let e = build(&reg, "s5", seg("snapshot", 8, &args)).err().unwrap().to_string();
        assert!(e.contains(want), "{e}");
    }

    // A reload of the same device reuses the live store (no reformat, same exceptions).
    let snap2 = build(&reg, "s", seg("snapshot", 2048, &[&base, &cow, "P", "8"])).unwrap();
    assert_eq!(snap2.status().line, "40/2048 16");
    // ... with other parameters it is refused.
    let e = build(&reg, "s", seg("snapshot", 2048, &[&base, &cow, "P", "16"])).err().unwrap().to_string();
    assert!(e.contains("already in use by a snapshot"), "{e}");
    snap.shutdown();
    assert!(io(&snap, dmrep_core::Op::Read, 0, vec![0; 512]).is_err());
    assert_eq!(io(&snap2, dmrep_core::Op::Read, 0, vec![0; 512]).unwrap(), vec![0x11; 512]);
    // Gone: the next load reopens the store from the device.
    snap2.shutdown();
    drop((snap, snap2));
    assert_eq!(other.snapshots().len(), 0);
    let snap3 = build(&reg, "s", seg("snapshot", 2048, &[&base, &cow, "P", "8"])).unwrap();
    assert_eq!(snap3.status().line, "40/2048 16");
    assert_eq!(io(&snap3, dmrep_core::Op::Read, 0, vec![0; 12288]).unwrap(), vec![0x11; 12288]);
    // Snapshot writes.
    io(&snap3, dmrep_core::Op::Write { fua: true }, 100, vec![0x44; 10]).unwrap();
    let got = io(&snap3, dmrep_core::Op::Read, 0, vec![0; 512]).unwrap();
    assert_eq!(&got[95..115], &[[0x11; 5], [0x44; 5], [0x44; 5], [0x11; 5]].concat()[..]);
    assert_eq!(io(&org, dmrep_core::Op::Read, 100, vec![0; 4]).unwrap(), vec![0x33; 4], "origin unchanged");
}
