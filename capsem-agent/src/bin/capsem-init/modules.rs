//! Kernel modules, loaded with `finit_module` from lists made at image build
//! time (uncompressed `.ko` files): one for every boot, and one each for
//! shares and the network, loaded only when asked for (each module costs
//! boot time under TCG).
//!
//! A list line is a module's path, then the paths of the modules in the same
//! list it must follow (its `depends=` and what its init needs registered).
//! [`load_list`] loads on one thread per CPU (at most [`MAX_WORKERS`]), each
//! module as soon as those it follows are in: under TCG the ext4 chain
//! alone takes about as long as all the others.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use crossbeam_channel::unbounded;
use nix::errno::Errno;

/// The list the image build writes, loaded at every boot.
pub const MODULE_LIST: &str = "/etc/capsem/modules";
/// The modules only shares need (virtiofs), loaded when there are shares.
pub const SHARE_MODULE_LIST: &str = "/etc/capsem/modules.share";
/// The modules only the network needs (dummy, nftables), loaded with
/// `capsem.net=1`.
pub const NET_MODULE_LIST: &str = "/etc/capsem/modules.net";
/// Where the listed modules live in the initramfs (removed once loaded).
pub const MODULE_DIR: &str = "/lib/modules";
/// Loader threads at most (a guest has few vCPUs; more buys nothing).
pub const MAX_WORKERS: usize = 4;

/// Errors reading the list or loading a module.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot read module list {path}")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open module {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load module {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("module list {list}, line {line}: {after} is not listed before {path}")]
    Order {
        list: PathBuf,
        line: usize,
        path: PathBuf,
        after: PathBuf,
    },
    #[error("a module loader thread did not start")]
    Thread(#[source] std::io::Error),
    #[error("loading module {0} panicked")]
    Panicked(PathBuf),
}

/// One module and the indexes (in its list) of the modules it follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub after: Vec<usize>,
}

/// The entries of `text` (the list at `list`), skipping blank lines and `#`
/// comments. Each path after a line's first names a module that one
/// follows, which must be on an earlier line (so the order has no cycle); a
/// path on no line at all is one an earlier list loaded.
pub fn parse_list(list: &Path, text: &str) -> Result<Vec<Entry>, ModuleError> {
    let mut seen: HashMap<PathBuf, usize> = HashMap::new();
    let mut later: Vec<(usize, PathBuf, PathBuf)> = Vec::new();
    let mut out: Vec<Entry> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace().map(PathBuf::from);
        let Some(path) = words.next() else { continue };
        let mut after = Vec::new();
        for dep in words {
            match seen.get(&dep) {
                Some(&i) => after.push(i),
                None => later.push((n + 1, path.clone(), dep)),
            }
        }
        seen.insert(path.clone(), out.len());
        out.push(Entry { path, after });
    }
    // A dependency listed after its dependent (or never) is checked once
    // every path is known: after it is an error, absent is an earlier list's.
    if let Some((line, path, after)) = later.into_iter().find(|(_, _, d)| seen.contains_key(d)) {
        return Err(ModuleError::Order {
            list: list.to_owned(),
            line,
            path,
            after,
        });
    }
    Ok(out)
}

/// Loads every module in `list`, each after those it follows. Returns how
/// many were newly loaded; one that is already loaded (or built in) is not
/// an error.
pub fn load_list(list: &Path) -> Result<usize, ModuleError> {
    let text = std::fs::read_to_string(list).map_err(|source| ModuleError::List {
        path: list.to_owned(),
        source,
    })?;
    let entries = parse_list(list, &text)?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS));
    load_all(&entries, workers, load)
}

/// Runs `load` for every entry on `workers` threads, an entry once all it
/// follows have loaded. The first error stops new loads; the ones already
/// running finish, and the error is returned once the threads are joined.
pub fn load_all<F>(entries: &[Entry], workers: usize, load: F) -> Result<usize, ModuleError>
where
    F: Fn(&Path) -> Result<bool, ModuleError> + Sync,
{
    let mut waiting: Vec<usize> = entries.iter().map(|e| e.after.len()).collect();
    let mut next: Vec<Vec<usize>> = vec![Vec::new(); entries.len()];
    for (i, e) in entries.iter().enumerate() {
        for &d in &e.after {
            next[d].push(i);
        }
    }
    let (job_tx, job_rx) = unbounded::<usize>();
    let (done_tx, done_rx) = unbounded::<(usize, Result<bool, ModuleError>)>();
    std::thread::scope(|scope| {
        let mut threads = Vec::new();
        for n in 0..workers.max(1) {
            let (jobs, done, load) = (job_rx.clone(), done_tx.clone(), &load);
            let thread = std::thread::Builder::new()
                .name(format!("modules-{n}"))
                .spawn_scoped(scope, move || {
                    for i in jobs.iter() {
                        let path = &entries[i].path;
                        // A panic is reported like a failed load, so the
                        // coordinator still hears of every job it sent.
                        let result = std::panic::catch_unwind(AssertUnwindSafe(|| load(path)))
                            .unwrap_or_else(|_| Err(ModuleError::Panicked(path.clone())));
                        if done.send((i, result)).is_err() {
                            break;
                        }
                    }
                })
                .map_err(ModuleError::Thread);
            match thread {
                Ok(t) => threads.push(t),
                // The threads that did start are enough.
                Err(ModuleError::Thread(e)) if !threads.is_empty() => {
                    crate::log!("warning: a module loader thread did not start: {e}")
                }
                Err(e) => return Err(e),
            }
        }
        drop(done_tx);
        let mut running = 0;
        for (i, w) in waiting.iter().enumerate() {
            if *w == 0 {
                let _ = job_tx.send(i);
                running += 1;
            }
        }
        let (mut loaded, mut first_err) = (0, None);
        while running > 0 {
            // Every worker holds a sender until the job queue closes, so this
            // returns a result for each job sent.
            let Ok((i, result)) = done_rx.recv() else {
                break;
            };
            running -= 1;
            match result {
                Ok(newly) => {
                    loaded += usize::from(newly);
                    for &j in &next[i] {
                        waiting[j] -= 1;
                        if waiting[j] == 0 && first_err.is_none() {
                            let _ = job_tx.send(j);
                            running += 1;
                        }
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        drop(job_tx);
        for t in threads {
            let _ = t.join();
        }
        first_err.map_or(Ok(loaded), Err)
    })
}

/// Loads one module; `Ok(false)` when it was already loaded.
fn load(path: &Path) -> Result<bool, ModuleError> {
    let file = File::open(path).map_err(|source| ModuleError::Open {
        path: path.to_owned(),
        source,
    })?;
    let params = c"";
    // SAFETY: finit_module reads the module from an fd we own and keep open
    // for the call, and a NUL-terminated, empty parameter string; flags 0.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        return Ok(true);
    }
    match Errno::last() {
        Errno::EEXIST => Ok(false),
        source => Err(ModuleError::Load {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;
    use std::time::Duration;

    fn entry(path: &str, after: &[usize]) -> Entry {
        Entry {
            path: PathBuf::from(path),
            after: after.to_vec(),
        }
    }

    fn parse(text: &str) -> Result<Vec<Entry>, ModuleError> {
        parse_list(Path::new("/etc/capsem/modules"), text)
    }

    #[test]
    fn list_skips_comments_and_blanks() {
        let got = parse("# order matters\n/lib/a.ko\n\n  /lib/b.ko  \n").unwrap();
        assert_eq!(got, vec![entry("/lib/a.ko", &[]), entry("/lib/b.ko", &[])]);
    }

    #[test]
    fn a_line_names_the_modules_it_follows() {
        let got = parse("/a.ko\n/b.ko\n/c.ko /a.ko /b.ko\n/d.ko /c.ko /virtio.ko\n").unwrap();
        // /virtio.ko is in no line: an earlier list's, already loaded.
        assert_eq!(
            got,
            vec![
                entry("/a.ko", &[]),
                entry("/b.ko", &[]),
                entry("/c.ko", &[0, 1]),
                entry("/d.ko", &[2]),
            ]
        );
    }

    #[test]
    fn following_a_later_line_is_an_error() {
        let err = parse("/a.ko\n/b.ko /c.ko\n/c.ko\n").unwrap_err();
        let ModuleError::Order {
            line, path, after, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(
            (*line, path.as_path(), after.as_path()),
            (2, Path::new("/b.ko"), Path::new("/c.ko"))
        );
        // A module that follows itself is the same mistake.
        assert!(matches!(
            parse("/a.ko /a.ko\n"),
            Err(ModuleError::Order { .. })
        ));
    }

    /// What the fake loader saw: (path, "start" or "end") in time order.
    type Log = Mutex<Vec<(PathBuf, &'static str)>>;

    fn logged(log: &Log, path: &Path) {
        log.lock().unwrap().push((path.to_owned(), "start"));
        std::thread::sleep(Duration::from_millis(5));
        log.lock().unwrap().push((path.to_owned(), "end"));
    }

    #[test]
    fn each_module_starts_after_those_it_follows_end() {
        let entries = parse("/a.ko\n/b.ko\n/c.ko /a.ko\n/d.ko /c.ko /b.ko\n/e.ko\n").unwrap();
        let log = Log::default();
        let n = load_all(&entries, 3, |p| {
            logged(&log, p);
            Ok(p != Path::new("/e.ko"))
        })
        .unwrap();
        assert_eq!(n, 4, "e.ko was already loaded");
        let log = log.into_inner().unwrap();
        let at = |p: &str, what: &str| {
            log.iter()
                .position(|(q, w)| q == Path::new(p) && *w == what)
                .unwrap_or_else(|| panic!("{p} {what} missing from {log:?}"))
        };
        assert_eq!(log.len(), 10, "each module once: {log:?}");
        assert!(at("/a.ko", "end") < at("/c.ko", "start"));
        assert!(at("/c.ko", "end") < at("/d.ko", "start"));
        assert!(at("/b.ko", "end") < at("/d.ko", "start"));
    }

    #[test]
    fn independent_modules_load_at_the_same_time() {
        // Each load waits for the other's signal: one loader thread, or a
        // loader that ran them one by one, would time out instead.
        let entries = parse("/a.ko\n/b.ko\n").unwrap();
        let (a_tx, a_rx) = crossbeam_channel::bounded::<()>(1);
        let (b_tx, b_rx) = crossbeam_channel::bounded::<()>(1);
        let n = load_all(&entries, 2, |p| {
            let (mine, theirs) = if p == Path::new("/a.ko") {
                (&a_tx, &b_rx)
            } else {
                (&b_tx, &a_rx)
            };
            mine.send(()).unwrap();
            theirs
                .recv_timeout(Duration::from_secs(10))
                .map(|()| true)
                .map_err(|_| ModuleError::Panicked(p.to_owned()))
        })
        .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn a_failure_stops_its_dependents_and_is_returned() {
        let entries = parse("/a.ko\n/b.ko /a.ko\n/c.ko\n").unwrap();
        let log = Log::default();
        let err = load_all(&entries, 1, |p| {
            logged(&log, p);
            if p == Path::new("/a.ko") {
                Err(ModuleError::Load {
                    path: p.to_owned(),
                    source: Errno::ENOEXEC,
                })
            } else {
                Ok(true)
            }
        })
        .unwrap_err();
        assert!(
            matches!(&err, ModuleError::Load { path, source: Errno::ENOEXEC } if path == Path::new("/a.ko"))
        );
        let log = log.into_inner().unwrap();
        assert!(!log.iter().any(|(p, _)| p == Path::new("/b.ko")), "{log:?}");
    }

    #[test]
    fn a_panicking_load_is_an_error_not_a_hang() {
        let entries = parse("/a.ko\n/b.ko\n").unwrap();
        let err = load_all(&entries, 2, |p| {
            if p == Path::new("/a.ko") {
                panic!("test panic");
            }
            Ok(true)
        })
        .unwrap_err();
        assert!(
            matches!(&err, ModuleError::Panicked(p) if p == Path::new("/a.ko")),
            "{err:?}"
        );
    }

    #[test]
    fn missing_list_is_a_typed_error() {
        let err = load_list(Path::new("/nonexistent/capsem/modules")).unwrap_err();
        assert!(matches!(err, ModuleError::List { .. }));
    }

    #[test]
    fn missing_module_is_a_typed_error() {
        let err = load(Path::new("/nonexistent/x.ko")).unwrap_err();
        assert!(matches!(err, ModuleError::Open { .. }));
    }
}
