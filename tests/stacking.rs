//! Stacking: a table names another device of the same daemon as `/dev/mapper/NAME`.
//! A stack of three levels carries I/O to the file at the bottom; the ranges a table
//! uses are claimed like a file's; a device in use cannot be removed (its users are
//! named); `ls --tree` shows the stack; a reload and a restart keep it, restored in
//! dependency order even when the creation order was different.

mod common;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn a_stack_of_three_levels_works_is_guarded_and_survives_a_restart() {
    require!("qemu-io");
    let mut d = Daemon::start();
    let base = d.make_file_s("base", 16 * MIB);
    d.create("a", &format!("0 32768 linear {base} 0"));
    d.create("b", "0 16384 linear /dev/mapper/a 8192");
    d.create("c", "0 8192 linear /dev/mapper/b 0");
    qemu_io_ok(&d.uri("c"), &["write -P 0x5a 0 1M"]);
    assert_eq!(read_at(std::path::Path::new(&base), 4 * MIB, 4), vec![0x5a; 4], "c -> b -> a -> the file");

    // Guards: what is in use cannot go, another table cannot take the same range, and a
    // device cannot sit on itself or on nothing.
    let e = d.cli_err(&["remove", "a"]);
    assert!(e.contains("used by b"), "{e}");
    let e = d.cli_err(&["remove", "b"]);
    assert!(e.contains("used by c"), "{e}");
    let e = d.cli_err(&["create", "x", "--table", "0 1024 linear /dev/mapper/a 8192"]);
    assert!(e.contains("b"), "the range is b's: {e}");
    let e = d.cli_err(&["create", "y", "--table", "0 1024 linear /dev/mapper/nosuch 0"]);
    assert!(e.contains("no device named nosuch"), "{e}");
    let e = d.cli_err(&["create", "z", "--table", "0 99999 linear /dev/mapper/c 0"]);
    assert!(e.contains("past the end"), "{e}");

    let tree = d.cli_ok(&["ls", "--tree"]);
    assert!(tree.contains("c\n └─b\n   └─a\n"), "{tree}");

    // A reload moves c within b; the old data is where it was.
    d.cli_ok(&["load", "c", "--table", "0 8192 linear /dev/mapper/b 4096"]);
    d.cli_ok(&["resume", "c"]);
    qemu_io_ok(&d.uri("c"), &["write -P 0x6b 0 64k"]);
    assert_eq!(read_at(std::path::Path::new(&base), (4 + 2) * MIB, 1), vec![0x6b]);

    // Created in the other order: e first, then f, then e reloaded onto f.
    let f1 = d.make_file_s("f1", 4 * MIB);
    let f2 = d.make_file_s("f2", 4 * MIB);
    d.create("e", &format!("0 8192 linear {f1} 0"));
    d.create("f", &format!("0 8192 linear {f2} 0"));
    d.cli_ok(&["load", "e", "--table", "0 4096 linear /dev/mapper/f 0"]);
    d.cli_ok(&["resume", "e"]);
    qemu_io_ok(&d.uri("e"), &["write -P 0x7c 0 64k"]);

    d.restart();
    let names = d.names();
    for n in ["a", "b", "c", "e", "f"] {
        assert!(names.contains(&n.to_string()), "{n} restored: {names:?}");
    }
    let info = d.json(&["ls"]);
    assert!(info.as_array().unwrap().iter().all(|x| x["reason"].is_null()), "all available: {info}");
    let out = qemu_io_ok(&d.uri("c"), &["read -P 0x6b 0 64k"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let out = qemu_io_ok(&d.uri("e"), &["read -P 0x7c 0 64k"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(read_at(std::path::Path::new(&f2), 0, 1), vec![0x7c]);

    // Top down, they go.
    for n in ["c", "b", "a", "e", "f"] {
        d.cli_ok(&["remove", n]);
    }
}
