//! The guest console's output path: a vCPU writing COM1 never blocks on the host side. Bytes
//! go into a bounded buffer that a console thread drains into the real sink (the terminal,
//! a pipe, a file); when the sink stops taking them (a full pipe nobody reads) the buffer
//! fills and further guest output is dropped and counted, while the vCPU runs on and stays
//! able to stop.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most guest output held for a slow sink.
pub const CONSOLE_BUFFER: usize = 256 << 10;
/// The most bytes one write to the sink carries.
const CHUNK: usize = 16 << 10;
/// How long a partial line may wait for the rest of it: the guest writes its console a byte
/// per exit, and one write (and one wake-up) per line instead of per byte saves both threads
/// a system call per byte; a prompt without a newline still shows within this.
const COALESCE: Duration = Duration::from_millis(1);

#[derive(Default)]
struct State {
    buf: VecDeque<u8>,
    /// The console thread is writing a chunk it already took out of `buf`.
    writing: bool,
    /// A line ended (or the buffer filled a chunk) since the last drain: write it now.
    line_ready: bool,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when output arrives (for the console thread) and when the buffer empties
    /// (for [`ConsoleDrain::finish`]).
    changed: Condvar,
    dropped: AtomicU64,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain bytes behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The vCPU side: what the UART writes to. Never blocks beyond a short lock.
pub struct ConsoleOutput(Arc<Shared>);

impl Write for ConsoleOutput {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut st = self.0.lock();
        let room = self.0.capacity.saturating_sub(st.buf.len());
        let n = data.len().min(room);
        let was_empty = st.buf.is_empty();
        st.buf.extend(&data[..n]);
        let line_done = !st.line_ready && (data[..n].contains(&b'\n') || st.buf.len() >= CHUNK);
        st.line_ready |= line_done;
        drop(st);
        if n < data.len() {
            self.0
                .dropped
                .fetch_add((data.len() - n) as u64, Ordering::Relaxed);
        }
        if (was_empty || line_done) && n > 0 {
            self.0.changed.notify_all();
        }
        // Dropped bytes are reported as written: the guest's UART must not see an error.
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The VMM side: waits (briefly) for the console thread to write out what is buffered.
pub struct ConsoleDrain {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ConsoleDrain {
    /// Bytes of guest output dropped because the sink did not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Lets the console thread write what is buffered, waiting at most `limit`: a sink that
    /// takes nothing (a pipe nobody reads) must not keep the VMM from exiting. Returns
    /// whether everything was written.
    pub fn finish(mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut st = self.shared.lock();
        st.closed = true;
        self.shared.changed.notify_all();
        while !st.buf.is_empty() || st.writing {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = match self.shared.changed.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        drop(st);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        true
    }
}

/// Starts the console thread over `sink`, running `on_start` (its seccomp filter) first;
/// the output end goes to the UART.
pub fn spawn(
    sink: Box<dyn Write + Send>,
    capacity: usize,
    on_start: impl FnOnce() + Send + 'static,
) -> std::io::Result<(ConsoleOutput, ConsoleDrain)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
        dropped: AtomicU64::new(0),
        capacity,
    });
    let worker = shared.clone();
    let thread = std::thread::Builder::new()
        .name("console".into())
        .stack_size(64 << 10)
        .spawn(move || {
            on_start();
            drain_loop(&worker, sink)
        })?;
    Ok((
        ConsoleOutput(shared.clone()),
        ConsoleDrain {
            shared,
            thread: Some(thread),
        },
    ))
}

fn drain_loop(shared: &Shared, mut sink: Box<dyn Write + Send>) {
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        {
            let mut st = shared.lock();
            st.writing = false;
            if st.buf.is_empty() {
                shared.changed.notify_all();
            }
            while st.buf.is_empty() {
                if st.closed {
                    return;
                }
                st = match shared.changed.wait(st) {
                    Ok(g) => g,
                    Err(e) => e.into_inner(),
                };
            }
            // Give a partial line a moment to end, so it goes out in one write.
            let deadline = Instant::now() + COALESCE;
            while !st.line_ready && !st.closed {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                st = match shared.changed.wait_timeout(st, deadline - now) {
                    Ok((g, _)) => g,
                    Err(e) => e.into_inner().0,
                };
            }
            st.line_ready = false;
            let n = st.buf.len().min(CHUNK);
            chunk.clear();
            chunk.extend(st.buf.drain(..n));
            st.writing = true;
        }
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            match sink.write(rest) {
                Ok(0) => break,
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A non-blocking sink that is full: wait for it here, not on a vCPU.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                // The reader went away or the disk is full: the guest's output is lost.
                Err(_) => break,
            }
        }
        if !rest.is_empty() {
            shared
                .dropped
                .fetch_add(rest.len() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A sink that never takes anything, like a pipe nobody reads.
    struct Stuck(Arc<(Mutex<bool>, Condvar)>);
    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            let (m, c) = &*self.0;
            let mut g = m.lock().unwrap();
            while !*g {
                g = c.wait(g).unwrap();
            }
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Counts the sink's write calls.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<usize>>>);
    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A guest writes its console a byte at a time; the sink gets whole lines.
    #[test]
    fn bytes_of_a_line_go_out_in_one_write() {
        let calls = Calls::default();
        let (mut out, drain) = spawn(Box::new(calls.clone()), 4096, || {}).unwrap();
        for _ in 0..10 {
            for &b in b"probe: a console line\n" {
                out.write_all(&[b]).unwrap();
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        assert!(drain.finish(Duration::from_secs(5)));
        let writes = calls.0.lock().unwrap().clone();
        assert_eq!(writes.iter().sum::<usize>(), 220);
        assert!(
            writes.len() <= 30,
            "{} writes for 10 lines: {writes:?}",
            writes.len()
        );
    }

    #[test]
    fn output_reaches_the_sink_in_order() {
        let cap = Captured::default();
        let (mut out, drain) = spawn(Box::new(cap.clone()), 1024, || {}).unwrap();
        for i in 0..100u8 {
            out.write_all(&[b'a' + i % 26]).unwrap();
        }
        assert!(drain.finish(Duration::from_secs(5)));
        let got = cap.0.lock().unwrap().clone();
        assert_eq!(got.len(), 100);
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, &b)| b == b'a' + (i % 26) as u8));
    }

    #[test]
    fn a_stuck_sink_never_blocks_the_writer_and_drops_are_counted() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (mut out, drain) = spawn(Box::new(Stuck(gate.clone())), 64, || {}).unwrap();
        let t0 = Instant::now();
        for _ in 0..10_000 {
            out.write_all(b"0123456789").unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "the writer blocked");
        // The thread holds at most one chunk; the buffer at most its capacity.
        assert!(drain.dropped() >= 100_000 - 64 - CHUNK as u64);
        assert!(
            !drain.finish(Duration::from_millis(50)),
            "nothing can be written"
        );
        let (m, c) = &*gate;
        *m.lock().unwrap() = true;
        c.notify_all();
    }
}
