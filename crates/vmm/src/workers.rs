//! The spawner thread: starts device worker threads on behalf of the vCPU threads that
//! activate devices. A thread inherits its creator's seccomp filter, and a vCPU thread's is
//! too tight to create threads, so activation asks this thread (over a channel) instead.
//! Each worker installs its own filter before it runs the device's code.

use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio::{WorkerKind, WorkerSpawner};

use crate::seccomp::{Filters, ThreadKind};

type Reply = SyncSender<std::io::Result<JoinHandle<()>>>;

struct Request {
    kind: WorkerKind,
    body: Box<dyn FnOnce() + Send>,
    reply: Reply,
}

/// The handle every transport gets; cheap to clone.
pub struct Spawner {
    requests: Mutex<Sender<Request>>,
}

fn thread_kind(kind: WorkerKind) -> ThreadKind {
    match kind {
        WorkerKind::Block => ThreadKind::BlockWorker,
        WorkerKind::Net => ThreadKind::NetWorker,
    }
}

impl Spawner {
    /// Starts the spawner thread; it installs its own filter first.
    pub fn start(filters: Arc<Filters>) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = channel::<Request>();
        std::thread::Builder::new()
            .name("spawner".into())
            .stack_size(64 << 10)
            .spawn(move || {
                filters.apply_or_exit(ThreadKind::Spawner);
                // Ends when every Spawner handle is gone (the VM's devices dropped).
                while let Ok(req) = rx.recv() {
                    let f = filters.clone();
                    let kind = thread_kind(req.kind);
                    let body = req.body;
                    let started = std::thread::Builder::new()
                        .name(req.kind.name().into())
                        .spawn(move || {
                            f.apply_or_exit(kind);
                            body()
                        });
                    let _ = req.reply.send(started);
                }
            })?;
        Ok(Arc::new(Self {
            requests: Mutex::new(tx),
        }))
    }
}

impl WorkerSpawner for Spawner {
    fn spawn(
        &self,
        kind: WorkerKind,
        body: Box<dyn FnOnce() + Send>,
    ) -> std::io::Result<JoinHandle<()>> {
        let (reply, answer) = sync_channel(1);
        let gone = || std::io::Error::other("the spawner thread has stopped");
        self.requests
            .lock()
            .map_err(|_| gone())?
            .send(Request { kind, body, reply })
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}
