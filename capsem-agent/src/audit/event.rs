//! Exec events from kernel audit records: [`Assembler`] groups the records
//! of one event by serial and emits them in serial order (the rules are in
//! [`super::parse`], which parses each record's text).

use std::collections::BTreeMap;

#[cfg(test)]
use capsem_proto::audit::MAX_AUDIT_FRAME;
use capsem_proto::audit::{AuditRecord, MAX_AUDIT_ARGS, MAX_AUDIT_FIELD};

use super::parse::*;

/// An exec event whose `EOE` has not arrived yet.
#[derive(Debug, Clone, Default)]
struct Partial {
    id: String,
    time_ms: u64,
    syscall: Syscall,
    /// An `EXECVE` record arrived (a successful exec always has one).
    saw_execve: bool,
    argc: Option<u64>,
    /// Argument index → raw bytes, at most `MAX_AUDIT_FIELD + 1` kept per
    /// argument (enough to know it was cut).
    args: BTreeMap<usize, Vec<u8>>,
    /// An argument at index `MAX_AUDIT_ARGS` or above was seen.
    beyond: bool,
    /// Some argument had more bytes than were kept.
    cut: bool,
    cwd: Option<Vec<u8>>,
}

/// Raw bytes kept per argument.
const ARG_KEEP: usize = MAX_AUDIT_FIELD + 1;

impl Partial {
    fn syscall_fields(&mut self, body: &str) {
        for (key, value) in fields(body) {
            let num = || value.raw().parse::<u32>().ok();
            match key {
                "pid" => self.syscall.pid = num().unwrap_or(0),
                "ppid" => self.syscall.ppid = num().unwrap_or(0),
                "uid" => self.syscall.uid = num().unwrap_or(u32::MAX),
                "success" => self.syscall.success = value.raw() == "yes",
                "exe" => self.syscall.exe = value.bytes(),
                // Never hex: a device name or `(none)`.
                "tty" => self.syscall.tty = value.raw().to_owned(),
                _ => {}
            }
        }
    }

    fn execve_fields(&mut self, body: &str) {
        self.saw_execve = true;
        for (key, value) in fields(body) {
            if key == "argc" {
                self.argc = value.raw().parse().ok();
                continue;
            }
            let Some(rest) = key.strip_prefix('a') else {
                continue;
            };
            // `aN`, `aN[i]` (a chunk of a long argument) or `aN_len`.
            let (index, chunk) = match rest.split_once('[') {
                Some((n, _)) => (n, true),
                None if rest.ends_with("_len") => continue,
                None => (rest, false),
            };
            let Ok(index) = index.parse::<usize>() else {
                continue;
            };
            if index >= MAX_AUDIT_ARGS {
                self.beyond = true;
                continue;
            }
            let bytes = value.bytes();
            let arg = self.args.entry(index).or_default();
            if !chunk {
                arg.clear();
            }
            let room = ARG_KEEP.saturating_sub(arg.len());
            if bytes.len() > room {
                self.cut = true;
            }
            arg.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
    }

    fn finish(self, serial: u64) -> AuditRecord {
        // A successful exec without its EXECVE record lost its arguments.
        let mut truncated = self.beyond || self.cut || (self.syscall.success && !self.saw_execve);
        let mut argv = Vec::with_capacity(self.args.len());
        let mut budget = ARGV_BUDGET;
        // Missing indices (lost records) become empty strings, flagged.
        let count = self.args.keys().next_back().map_or(0, |last| last + 1);
        for i in 0..count {
            let raw = match self.args.get(&i) {
                Some(raw) => raw.as_slice(),
                None => {
                    truncated = true;
                    &[]
                }
            };
            let (arg, cut) = bounded_string(raw, MAX_AUDIT_FIELD);
            truncated |= cut;
            let cost = arg.len() + ARG_OVERHEAD;
            if cost > budget {
                truncated = true;
                break;
            }
            budget -= cost;
            argv.push(arg);
        }
        if let Some(argc) = self.argc {
            if argc > argv.len() as u64 {
                truncated = true;
            }
        }
        let (exe, _) = bounded_string(&self.syscall.exe, MAX_AUDIT_FIELD);
        let cwd = self
            .cwd
            .map(|c| bounded_string(&c, MAX_AUDIT_FIELD).0)
            .unwrap_or_default();
        let tty = if self.syscall.tty.is_empty() {
            "(none)".to_owned()
        } else {
            bounded_string(self.syscall.tty.as_bytes(), MAX_AUDIT_FIELD).0
        };
        let (audit_id, _) = bounded_string(self.id.as_bytes(), MAX_AUDIT_FIELD);
        AuditRecord {
            serial,
            time_ms: self.time_ms,
            pid: self.syscall.pid,
            ppid: self.syscall.ppid,
            uid: self.syscall.uid,
            exe,
            argv,
            argv_truncated: truncated,
            cwd,
            tty,
            success: self.syscall.success,
            audit_id,
        }
    }
}

/// What [`Assembler`] did with the records it was fed, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AssemblerStats {
    /// Text that was not `audit(SECS.MILLIS:SERIAL): ...`.
    pub malformed: u64,
    /// Exec events closed without their `EOE`.
    pub forced: u64,
    /// Records for an exec event at or below a serial already emitted.
    pub late: u64,
}

/// Groups the records of exec events by serial and emits them in serial
/// order. Everything that is not part of an exec event is ignored.
#[derive(Debug, Default)]
pub struct Assembler {
    open: BTreeMap<u64, Partial>,
    done: BTreeMap<u64, AuditRecord>,
    last_emitted: Option<u64>,
    stats: AssemblerStats,
}

impl Assembler {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stats(&self) -> AssemblerStats {
        self.stats
    }

    /// Feeds one record (its netlink type and its text, `audit(...): ...`);
    /// appends the exec records that are now complete, in serial order.
    pub fn feed(&mut self, kind: u16, text: &str, out: &mut Vec<AuditRecord>) {
        let Some((stamp, body)) = split_header(text) else {
            self.stats.malformed += 1;
            return;
        };
        let serial = stamp.serial;
        let late = self.last_emitted.is_some_and(|last| serial <= last);
        match kind {
            AUDIT_SYSCALL => {
                let mut arch = None;
                let mut nr = None;
                for (key, value) in fields(body) {
                    match key {
                        "arch" => arch = u32::from_str_radix(value.raw(), 16).ok(),
                        "syscall" => nr = value.raw().parse::<u64>().ok(),
                        _ => {}
                    }
                }
                let (Some(arch), Some(nr)) = (arch, nr) else {
                    return;
                };
                if !is_exec(arch, nr) {
                    return;
                }
                if late {
                    self.stats.late += 1;
                    return;
                }
                if !self.open.contains_key(&serial) && self.open.len() >= MAX_OPEN {
                    self.force_oldest();
                }
                let partial = self.open.entry(serial).or_default();
                partial.id = stamp.id.to_owned();
                partial.time_ms = stamp.time_ms;
                partial.syscall_fields(body);
            }
            AUDIT_EXECVE => {
                if let Some(p) = self.open.get_mut(&serial) {
                    p.execve_fields(body);
                }
            }
            AUDIT_CWD => {
                if let Some(p) = self.open.get_mut(&serial) {
                    if let Some((_, v)) = fields(body).find(|(k, _)| *k == "cwd") {
                        p.cwd = Some(v.bytes());
                    }
                }
            }
            AUDIT_EOE => {
                if let Some(p) = self.open.remove(&serial) {
                    self.done.insert(serial, p.finish(serial));
                    while self.done.len() > MAX_HELD && !self.open.is_empty() {
                        self.force_oldest();
                    }
                }
            }
            _ => {}
        }
        self.flush(out);
    }

    /// Closes every open event as it is and emits everything, in order. For
    /// the end of a finite source.
    pub fn finish(&mut self, out: &mut Vec<AuditRecord>) {
        while !self.open.is_empty() {
            self.force_oldest();
        }
        self.flush(out);
    }

    fn force_oldest(&mut self) {
        if let Some((serial, p)) = self.open.pop_first() {
            self.stats.forced += 1;
            self.done.insert(serial, p.finish(serial));
        }
    }

    /// Emits completed events older than every open one.
    fn flush(&mut self, out: &mut Vec<AuditRecord>) {
        while let Some((&serial, _)) = self.done.first_key_value() {
            if self.open.keys().next().is_some_and(|&open| open < serial) {
                break;
            }
            if let Some((serial, rec)) = self.done.pop_first() {
                self.last_emitted = Some(serial);
                out.push(rec);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HDR: &str = "audit(1700000000.123:";

    fn syscall(serial: u64, extra: &str) -> String {
        format!(
            "{HDR}{serial}): arch=c000003e syscall=59 success=yes exit=0 a0=55d0c8a0f2a0 \
             a1=55d0c8a0e9c0 a2=55d0c8a0d010 a3=8 items=2 ppid=812 pid=900 auid=4294967295 \
             uid=0 gid=0 euid=0 suid=0 fsuid=0 egid=0 sgid=0 fsgid=0 tty=pts0 \
             ses=4294967295 comm=\"ls\" exe=\"/usr/bin/ls\" {extra}key=(null)"
        )
    }

    fn feed(asm: &mut Assembler, lines: &[(u16, String)]) -> Vec<AuditRecord> {
        let mut out = Vec::new();
        for (kind, text) in lines {
            asm.feed(*kind, text, &mut out);
        }
        out
    }

    fn event(serial: u64, execve: &str) -> Vec<(u16, String)> {
        vec![
            (AUDIT_SYSCALL, syscall(serial, "")),
            (AUDIT_EXECVE, format!("{HDR}{serial}): {execve}")),
            (AUDIT_CWD, format!("{HDR}{serial}): cwd=\"/root\"")),
            (
                AUDIT_PATH,
                format!("{HDR}{serial}): item=0 name=\"/usr/bin/ls\" inode=1 nametype=NORMAL"),
            ),
            (
                AUDIT_PROCTITLE,
                format!("{HDR}{serial}): proctitle=6C73002D6C"),
            ),
            (AUDIT_EOE, format!("{HDR}{serial}): ")),
        ]
    }

    #[test]
    fn a_plain_exec() {
        let mut asm = Assembler::new();
        let out = feed(
            &mut asm,
            &event(45, "argc=3 a0=\"ls\" a1=\"-l\" a2=\"/tmp\""),
        );
        assert_eq!(
            out,
            vec![AuditRecord {
                serial: 45,
                time_ms: 1_700_000_000_123,
                pid: 900,
                ppid: 812,
                uid: 0,
                exe: "/usr/bin/ls".into(),
                argv: vec!["ls".into(), "-l".into(), "/tmp".into()],
                argv_truncated: false,
                cwd: "/root".into(),
                tty: "pts0".into(),
                success: true,
                audit_id: "1700000000.123:45".into(),
            }]
        );
        assert_eq!(asm.stats(), AssemblerStats::default());
    }

    #[test]
    fn hex_args_with_spaces_and_quotes_and_hex_cwd_and_exe() {
        // a1 = `hello world`, a2 = `say "hi"`, a3 = "caf\xc3\xa9" (UTF-8),
        // a4 = a lone 0xff byte.
        let mut lines = event(
            7,
            "argc=5 a0=\"echo\" a1=68656C6C6F20776F726C64 a2=7361792022686922 \
             a3=636166C3A9 a4=FF",
        );
        lines[0].1 = syscall(7, "").replace(
            "exe=\"/usr/bin/ls\"",
            "exe=2F746D702F6D792070726F67", // /tmp/my prog
        );
        lines[2].1 = format!("{HDR}7): cwd=2F686F6D652F6120622F22632022"); // /home/a b/"c "
        let out = feed(&mut Assembler::new(), &lines);
        assert_eq!(out.len(), 1);
        let r = &out[0];
        assert_eq!(
            r.argv,
            ["echo", "hello world", "say \"hi\"", "café", "\u{fffd}"]
        );
        assert_eq!(r.exe, "/tmp/my prog");
        assert_eq!(r.cwd, "/home/a b/\"c \"");
        assert!(!r.argv_truncated);
    }

    #[test]
    fn long_args_in_chunks_and_over_several_records() {
        let chunk = "41".repeat(600);
        let serial = 9;
        let lines = vec![
            (AUDIT_SYSCALL, syscall(serial, "")),
            (
                AUDIT_EXECVE,
                format!("{HDR}{serial}): argc=3 a0=\"x\" a1_len=1200 a1[0]={chunk}"),
            ),
            (
                AUDIT_EXECVE,
                format!("{HDR}{serial}): a1[1]={chunk} a2=\"tail\""),
            ),
            (AUDIT_EOE, format!("{HDR}{serial}): ")),
        ];
        let out = feed(&mut Assembler::new(), &lines);
        let r = &out[0];
        assert_eq!(r.argv.len(), 3);
        assert_eq!(r.argv[0], "x");
        // 1200 bytes cut to MAX_AUDIT_FIELD.
        assert_eq!(r.argv[1], "A".repeat(MAX_AUDIT_FIELD));
        assert_eq!(r.argv[2], "tail");
        assert!(r.argv_truncated);
        assert_eq!(r.cwd, "", "no CWD record");
    }

    #[test]
    fn many_args_are_capped() {
        let args: String = (0..300).map(|i| format!(" a{i}=\"arg{i}\"")).collect();
        let out = feed(&mut Assembler::new(), &event(3, &format!("argc=300{args}")));
        let r = &out[0];
        assert_eq!(r.argv.len(), MAX_AUDIT_ARGS);
        assert_eq!(r.argv[255], "arg255");
        assert!(r.argv_truncated);

        let args: String = (0..10).map(|i| format!(" a{i}=\"arg{i}\"")).collect();
        let out = feed(&mut Assembler::new(), &event(3, &format!("argc=10{args}")));
        assert_eq!(out[0].argv.len(), 10);
        assert!(!out[0].argv_truncated);
    }

    #[test]
    fn the_worst_case_record_fits_in_a_frame() {
        use capsem_proto::audit::AuditToHost;
        use capsem_proto::frame::AuditGuest;
        use capsem_proto::Codec;
        // 256 arguments of 1024 invalid bytes each: lossy conversion triples
        // them, the bounds cut them to 1024, the budget stops the list.
        let hex = "FF".repeat(MAX_AUDIT_FIELD);
        let args: String = (0..MAX_AUDIT_ARGS)
            .map(|i| format!(" a{i}={hex}"))
            .collect();
        let mut lines = event(11, &format!("argc={MAX_AUDIT_ARGS}{args}"));
        let long = "41".repeat(4096);
        lines[0].1 = syscall(11, "").replace("exe=\"/usr/bin/ls\"", &format!("exe={long}"));
        lines[2].1 = format!("{HDR}11): cwd={long}");
        let out = feed(&mut Assembler::new(), &lines);
        let r = &out[0];
        assert!(r.argv_truncated);
        assert!(r.argv.len() < MAX_AUDIT_ARGS);
        assert!(r.argv.iter().all(|a| a.len() <= MAX_AUDIT_FIELD));
        assert_eq!(r.exe.len(), MAX_AUDIT_FIELD);
        assert_eq!(r.cwd.len(), MAX_AUDIT_FIELD);
        let frame = Codec::<AuditGuest>::encode(&AuditToHost::Record(r.clone())).unwrap();
        assert!(frame.len() <= MAX_AUDIT_FRAME);
    }

    #[test]
    fn a_failed_exec_has_no_execve_record() {
        let serial = 12;
        let lines = vec![
            (
                AUDIT_SYSCALL,
                syscall(serial, "")
                    .replace("success=yes exit=0", "success=no exit=-2")
                    .replace("exe=\"/usr/bin/ls\"", "exe=\"/usr/bin/bash\""),
            ),
            (AUDIT_CWD, format!("{HDR}{serial}): cwd=\"/root\"")),
            (
                AUDIT_PATH,
                format!("{HDR}{serial}): item=0 name=\"/nope\" nametype=UNKNOWN"),
            ),
            (AUDIT_EOE, format!("{HDR}{serial}): ")),
        ];
        let out = feed(&mut Assembler::new(), &lines);
        assert_eq!(out.len(), 1);
        let r = &out[0];
        assert!(!r.success);
        assert_eq!(r.exe, "/usr/bin/bash");
        assert!(r.argv.is_empty());
        assert!(!r.argv_truncated);
        assert_eq!(r.cwd, "/root");
    }

    #[test]
    fn a_gap_in_the_arguments_is_flagged() {
        let mut lines = event(13, "argc=2 a1=\"second\"");
        lines.remove(2); // no CWD either
        let out = feed(&mut Assembler::new(), &lines);
        let r = &out[0];
        assert_eq!(r.argv, ["", "second"]);
        assert!(r.argv_truncated);
    }

    #[test]
    fn tty_none_and_missing_fields() {
        let serial = 14;
        let lines = vec![
            (
                AUDIT_SYSCALL,
                format!("{HDR}{serial}): arch=c000003e syscall=322 success=yes exit=0 tty=(none)"),
            ),
            (AUDIT_EOE, format!("{HDR}{serial}): ")),
        ];
        let out = feed(&mut Assembler::new(), &lines);
        let r = &out[0];
        assert_eq!(r.tty, "(none)");
        assert_eq!((r.pid, r.ppid, r.uid), (0, 0, u32::MAX));
        assert_eq!(r.exe, "");
        assert!(r.argv.is_empty());
        assert!(r.argv_truncated, "a successful exec lost its EXECVE record");
    }

    #[test]
    fn other_syscalls_and_record_types_are_ignored() {
        let mut asm = Assembler::new();
        let lines = vec![
            (
                AUDIT_SYSCALL,
                syscall(20, "").replace("syscall=59", "syscall=44"),
            ),
            (AUDIT_EOE, format!("{HDR}20): ")),
            // The same number on another architecture is not an exec.
            (
                AUDIT_SYSCALL,
                syscall(21, "").replace("arch=c000003e", "arch=c00000b7"),
            ),
            (AUDIT_EOE, format!("{HDR}21): ")),
            (
                1305,
                format!("{HDR}22): op=add_rule key=(null) list=4 res=1"),
            ),
            (AUDIT_EXECVE, format!("{HDR}23): argc=1 a0=\"orphan\"")),
            (AUDIT_EOE, format!("{HDR}23): ")),
            (AUDIT_SYSCALL, "not a record".to_owned()),
        ];
        assert!(feed(&mut asm, &lines).is_empty());
        assert_eq!(asm.stats().malformed, 1);
        // i386 and aarch64 execs count.
        assert!(is_exec(0x4000_0003, 11));
        assert!(is_exec(0xC000_00B7, 221));
        assert!(!is_exec(0xC000_003E, 221));
    }

    #[test]
    fn interleaved_events_come_out_in_serial_order() {
        let a = event(100, "argc=1 a0=\"a\"");
        let b = event(101, "argc=1 a0=\"b\"");
        let mut asm = Assembler::new();
        let mut out = Vec::new();
        // a's SYSCALL, then all of b, then the rest of a.
        asm.feed(a[0].0, &a[0].1, &mut out);
        for (k, t) in &b {
            asm.feed(*k, t, &mut out);
        }
        assert!(out.is_empty(), "b waits for the older a");
        for (k, t) in &a[1..] {
            asm.feed(*k, t, &mut out);
        }
        let serials: Vec<u64> = out.iter().map(|r| r.serial).collect();
        assert_eq!(serials, [100, 101]);
        assert_eq!(out[0].argv, ["a"]);
        assert_eq!(out[1].argv, ["b"]);
    }

    #[test]
    fn an_event_without_eoe_is_closed_once_enough_newer_ones_complete() {
        let mut asm = Assembler::new();
        let mut out = Vec::new();
        let lost = event(1, "argc=1 a0=\"lost-eoe\"");
        for (k, t) in &lost[..lost.len() - 1] {
            asm.feed(*k, t, &mut out);
        }
        for serial in 2..(2 + MAX_HELD as u64) {
            for (k, t) in event(serial, "argc=1 a0=\"x\"") {
                asm.feed(k, &t, &mut out);
            }
        }
        assert!(out.is_empty());
        for (k, t) in event(2 + MAX_HELD as u64, "argc=1 a0=\"x\"") {
            asm.feed(k, &t, &mut out);
        }
        assert_eq!(out.len(), MAX_HELD + 2);
        assert_eq!(out[0].argv, ["lost-eoe"]);
        assert_eq!(out[0].cwd, "/root");
        assert!(out.windows(2).all(|w| w[0].serial < w[1].serial));
        assert_eq!(asm.stats().forced, 1);
        // Its EOE arriving now is late and ignored; so is a replayed SYSCALL.
        asm.feed(AUDIT_EOE, &lost[lost.len() - 1].1, &mut out);
        asm.feed(AUDIT_SYSCALL, &lost[0].1, &mut out);
        assert_eq!(out.len(), MAX_HELD + 2);
        assert_eq!(asm.stats().late, 1);
    }

    #[test]
    fn too_many_open_events_close_the_oldest() {
        let mut asm = Assembler::new();
        let mut out = Vec::new();
        for serial in 1..=(MAX_OPEN as u64 + 1) {
            asm.feed(AUDIT_SYSCALL, &syscall(serial, ""), &mut out);
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].serial, 1);
        asm.finish(&mut out);
        assert_eq!(out.len(), MAX_OPEN + 1);
        assert_eq!(asm.stats().forced, MAX_OPEN as u64 + 1);
    }
}
