//! The host terminal: raw mode while the guest owns the console, restored on every exit
//! path (normal return, signal, panic), and a thread feeding stdin to the guest's UART.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use devices::legacy::Serial;

static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

/// Puts stdin in raw mode if it is a terminal; dropping the guard restores it.
pub struct RawModeGuard {
    active: bool,
}

impl RawModeGuard {
    pub fn enable() -> Self {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with valid termios pointers.
        unsafe {
            if libc::isatty(0) != 1 {
                return Self { active: false };
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return Self { active: false };
            }
            let _ = SAVED_TERMIOS.set(t);
            let mut raw = t;
            libc::cfmakeraw(&mut raw);
            // Keep output post-processing so host-side messages still start at column 0.
            raw.c_oflag = t.c_oflag;
            if libc::tcsetattr(0, libc::TCSANOW, &raw) != 0 {
                return Self { active: false };
            }
        }
        install_panic_restore();
        Self { active: true }
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        if self.active {
            restore();
        }
    }
}

/// Puts the terminal back as it was before raw mode.
pub fn restore() {
    if let Some(t) = SAVED_TERMIOS.get() {
        // SAFETY: restoring a termios read from the same fd.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, t);
        }
    }
}

fn install_panic_restore() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            prev(info);
        }));
    });
}

/// Whether stdin can ever give the guest input: not when it is closed or `/dev/null` (as
/// under orchestrators and benchmarks), where a reader thread would only cost a thread.
pub fn stdin_has_input() -> bool {
    // SAFETY: fstat on fd 0 into a zeroed stat we own.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(0, &mut st) != 0 {
            return false;
        }
        st
    };
    let is_char = st.st_mode & libc::S_IFMT == libc::S_IFCHR;
    // /dev/null is character device 1:3.
    !(is_char && libc::major(st.st_rdev) == 1 && libc::minor(st.st_rdev) == 3)
}

/// Feeds stdin to the UART's receive FIFO until stdin closes. The thread blocks in read();
/// it needs no stopping since it holds nothing that must be flushed.
pub fn spawn_stdin_reader(
    serial: Arc<Mutex<Serial>>,
    on_start: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("serial-in".into())
        .stack_size(64 << 10)
        .spawn(move || {
            on_start();
            let mut buf = [0u8; 64];
            loop {
                // SAFETY: reading into a valid stack buffer from fd 0.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                if n == 0 {
                    return;
                }
                if n < 0 {
                    if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return;
                }
                let mut pending = &buf[..n as usize];
                while !pending.is_empty() {
                    let taken = serial
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue_input(pending);
                    pending = &pending[taken..];
                    if taken == 0 {
                        // The guest has not drained its FIFO yet.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    #[test]
    fn dev_null_gives_no_input() {
        use std::os::fd::AsRawFd;
        let null = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: duplicating fd 0 to restore it afterwards.
        let saved = unsafe { libc::dup(0) };
        // SAFETY: swapping fd 0 for the test and restoring it.
        unsafe { libc::dup2(null.as_raw_fd(), 0) };
        let with_null = super::stdin_has_input();
        let (r, w) = {
            let mut fds = [0; 2];
            // SAFETY: pipe(2) into a local array.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            (fds[0], fds[1])
        };
        // SAFETY: as above.
        unsafe { libc::dup2(r, 0) };
        let with_pipe = super::stdin_has_input();
        // SAFETY: restoring fd 0 and closing the pipe.
        unsafe {
            libc::dup2(saved, 0);
            libc::close(saved);
            libc::close(r);
            libc::close(w);
        }
        assert!(!with_null);
        assert!(with_pipe);
    }
}
