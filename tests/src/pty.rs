//! A terminal for the program under test: a real PTY whose slave is the
//! program's controlling terminal, and a reader thread that collects every
//! byte the program writes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::pty::{openpty, Winsize};

/// Output collected so far, and whether the reader reached EOF.
#[derive(Debug, Default)]
struct Transcript {
    bytes: Vec<u8>,
    eof: bool,
}

/// A program running on a PTY.
#[derive(Debug)]
pub struct PtySession {
    master: File,
    child: Child,
    transcript: Arc<(Mutex<Transcript>, Condvar)>,
    reader: Option<JoinHandle<()>>,
    /// Offset in the transcript up to which `expect` has consumed output.
    cursor: usize,
    status: Option<ExitStatus>,
}

fn winsize(cols: u16, rows: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn set_size(fd: &impl AsRawFd, cols: u16, rows: u16) -> Result<()> {
    let ws = winsize(cols, rows);
    // SAFETY: TIOCSWINSZ reads one Winsize from the valid pointer we pass.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc != 0 {
        bail!("TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl PtySession {
    /// Starts `cmd` in a new session whose controlling terminal is a fresh
    /// PTY of the given size.
    pub fn spawn(mut cmd: Command, cols: u16, rows: u16) -> Result<Self> {
        let pty = openpty(Some(&winsize(cols, rows)), None).context("openpty")?;
        let slave: OwnedFd = pty.slave;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe; fd 0 is the slave.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawn on pty")?;
        // The slave copies were moved into the Command and dropped with it
        // after spawn, so the master sees EOF (EIO) once the child side closes.
        drop(cmd);
        let master = File::from(pty.master);
        let transcript = Arc::new((Mutex::new(Transcript::default()), Condvar::new()));
        let reader = {
            let mut master = master.try_clone()?;
            let transcript = Arc::clone(&transcript);
            std::thread::Builder::new()
                .name("test-pty-reader".into())
                .spawn(move || {
                    let mut buf = [0u8; 65536];
                    loop {
                        match master.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let (lock, cv) = &*transcript;
                                lock.lock()
                                    .expect("transcript")
                                    .bytes
                                    .extend_from_slice(&buf[..n]);
                                cv.notify_all();
                            }
                        }
                    }
                    let (lock, cv) = &*transcript;
                    lock.lock().expect("transcript").eof = true;
                    cv.notify_all();
                })?
        };
        Ok(Self {
            master,
            child,
            transcript,
            reader: Some(reader),
            cursor: 0,
            status: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes keystrokes.
    pub fn send(&mut self, bytes: impl AsRef<[u8]>) -> Result<()> {
        self.master
            .write_all(bytes.as_ref())
            .context("write to pty")
    }

    /// Types a line and Enter.
    pub fn line(&mut self, text: &str) -> Result<()> {
        self.send(format!("{text}\r"))
    }

    /// Changes the terminal size; the kernel sends SIGWINCH to the program.
    pub fn resize(&self, cols: u16, rows: u16) -> Result<()> {
        set_size(&self.master, cols, rows)
    }

    /// Waits until `needle` appears after the cursor, and moves the cursor
    /// past it.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.transcript;
        let mut t = lock.lock().expect("transcript");
        loop {
            if let Some(pos) = find(&t.bytes[self.cursor..], needle.as_bytes()) {
                self.cursor += pos + needle.len();
                return Ok(());
            }
            let now = Instant::now();
            if t.eof || now >= deadline {
                bail!(
                    "did not see {needle:?} within {timeout:?} (eof={}); output after cursor: {:?}",
                    t.eof,
                    String::from_utf8_lossy(&t.bytes[self.cursor..])
                );
            }
            t = cv.wait_timeout(t, deadline - now).expect("transcript").0;
        }
    }

    /// Waits until any of `needles` appears after the cursor; moves the
    /// cursor past the first one found and returns its index.
    pub fn expect_any(&mut self, needles: &[&str], timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.transcript;
        let mut t = lock.lock().expect("transcript");
        loop {
            let hay = &t.bytes[self.cursor..];
            let first = needles
                .iter()
                .enumerate()
                .filter_map(|(i, n)| Some((find(hay, n.as_bytes())?, i)))
                .min();
            if let Some((pos, i)) = first {
                self.cursor += pos + needles[i].len();
                return Ok(i);
            }
            let now = Instant::now();
            if t.eof || now >= deadline {
                bail!(
                    "did not see any of {needles:?} within {timeout:?} (eof={}); output after cursor: {:?}",
                    t.eof,
                    String::from_utf8_lossy(&t.bytes[self.cursor..])
                );
            }
            t = cv.wait_timeout(t, deadline - now).expect("transcript").0;
        }
    }

    /// Everything the program has written so far.
    pub fn transcript(&self) -> Vec<u8> {
        self.transcript.0.lock().expect("transcript").bytes.clone()
    }

    /// Waits for the program to exit and for its output to reach EOF.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let pidfd = capsem_host::pidfd::pidfd_open(self.child.id()).context("pidfd_open")?;
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&pidfd),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).context("poll")?;
        if n == 0 {
            bail!(
                "program did not exit within {timeout:?}; output: {:?}",
                String::from_utf8_lossy(&self.transcript())
            );
        }
        let status = self.child.wait().context("wait")?;
        self.status = Some(status);
        // The reader ends at EIO once every slave fd is closed; a leaked
        // grandchild holding the slave would keep it open, which the leftover
        // check reports, so do not wait on it forever here.
        let deadline = Instant::now() + Duration::from_secs(5);
        let (lock, cv) = &*self.transcript;
        let mut t = lock.lock().expect("transcript");
        while !t.eof && Instant::now() < deadline {
            t = cv
                .wait_timeout(t, deadline - Instant::now())
                .expect("transcript")
                .0;
        }
        Ok(status)
    }

    /// The exit code the way a shell reports it: the code, or 128+signal.
    pub fn wait_code(&mut self, timeout: Duration) -> Result<i32> {
        let status = self.wait(timeout)?;
        Ok(status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
    }
}

impl Drop for PtySession {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Closing our master would not end the reader while a clone is open;
        // the child is gone, so the slave side closes and the reader sees EIO,
        // unless a leaked process holds the slave: then detach rather than hang.
        if let Some(reader) = self.reader.take() {
            if reader.is_finished() || self.transcript.0.lock().map(|t| t.eof).unwrap_or(true) {
                let _ = reader.join();
            }
        }
    }
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_works() {
        assert_eq!(find(b"abcdef", b"cd"), Some(2));
        assert_eq!(find(b"abc", b"x"), None);
    }

    #[test]
    fn a_plain_shell_on_the_pty_round_trips() {
        let mut cmd = Command::new("/bin/sh");
        cmd.env("PS1", "$ ");
        let mut s = PtySession::spawn(cmd, 80, 24).unwrap();
        s.line("echo MARK$((40+2))").unwrap();
        s.expect("MARK42", Duration::from_secs(10)).unwrap();
        s.line("stty size").unwrap();
        s.expect("24 80", Duration::from_secs(10)).unwrap();
        s.line("exit 5").unwrap();
        assert_eq!(s.wait_code(Duration::from_secs(10)).unwrap(), 5);
    }
}
