//! Console input: on a terminal vireo puts stdin in raw mode, forwards keystrokes to the
//! guest's UART, and leaves the terminal exactly as it found it.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn openpty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds; the name/termios/winsize pointers may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: tcgetattr fills a zeroed termios for a valid fd.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(fd.as_raw_fd(), &mut t), 0);
        t
    }
}

/// Reads from the pty master until `needle` shows up or the deadline passes.
fn read_until(master: &OwnedFd, seen: &mut String, needle: &str, deadline: Instant) -> bool {
    let mut buf = [0u8; 256];
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut pfd = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one valid fd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
        if n <= 0 {
            continue;
        }
        // SAFETY: reading into a stack buffer from a valid fd.
        let r = unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r <= 0 {
            return seen.contains(needle);
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..r as usize]));
    }
    true
}

#[test]
fn console_input_reaches_the_guest_and_the_tty_is_restored() {
    if !kvm_available("console_input_reaches_the_guest_and_the_tty_is_restored") {
        return;
    }
    let (master, slave) = openpty();
    let before = termios(&slave);
    let elf = probe_elf();
    let mut child = Command::new(vireo_bin())
        .args([
            "--kernel",
            elf.to_str().unwrap(),
            "--cmdline",
            "probe.mode=echo",
        ])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()))
        .spawn()
        .expect("start vireo");
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let mut seen = String::new();
    let ready = read_until(&master, &mut seen, "probe: echo ready", deadline);
    if ready {
        // While the guest runs, the terminal is raw: no echo, no line editing.
        let during = termios(&slave);
        assert_eq!(during.c_lflag & (libc::ICANON | libc::ECHO), 0);
        let line = b"hello vireo\r";
        // SAFETY: writing a byte slice to a valid fd.
        let w = unsafe { libc::write(master.as_raw_fd(), line.as_ptr().cast(), line.len()) };
        assert_eq!(w, line.len() as isize);
    }
    let echoed = ready && read_until(&master, &mut seen, "PROBE-OK", deadline);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(ready && echoed, "console:\n{seen}");
    assert!(
        seen.contains("probe: echo line=hello vireo"),
        "console:\n{seen}"
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0), "console:\n{seen}");
    let after = termios(&slave);
    assert_eq!(
        (
            before.c_iflag,
            before.c_oflag,
            before.c_cflag,
            before.c_lflag
        ),
        (after.c_iflag, after.c_oflag, after.c_cflag, after.c_lflag),
        "terminal modes changed by vireo"
    );
    assert_eq!(before.c_cc, after.c_cc);
}
