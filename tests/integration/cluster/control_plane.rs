//! The cluster's control plane: an in-process xds-testserver (delta ADS + Istio CA) whose sockets
//! live in the control-plane network namespace, so that pods reach it over the simulated network.
//!
//! A socket belongs to the network namespace of the thread that created it, so the server runs on
//! its own thread that first joins the namespace (`setns`) and then runs a single-threaded tokio
//! runtime (worker threads it would spawn inherit the namespace too). The rest of the test process
//! stays in the root namespace; state changes go through the shared [`Handle`] (memory only).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use xds_testserver::{Handle, StateSource};

/// Moves the calling thread into the network namespace `name` (from `ip netns add`).
#[allow(unsafe_code)]
pub fn enter_netns(name: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(format!("/var/run/netns/{name}"))?;
    // SAFETY: `f` is an open namespace file for the duration of the call; setns(CLONE_NEWNET)
    // changes only the calling thread's network namespace and touches no memory of ours.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A running xds-testserver inside a namespace; stopped on drop.
pub struct ControlPlane {
    pub handle: Arc<Handle>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ControlPlane {
    /// Starts the server on `listen` inside namespace `netns`, serving `yaml`.
    pub fn start(netns: &str, listen: SocketAddr, yaml: &str) -> ControlPlane {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (netns, yaml) = (netns.to_owned(), yaml.to_owned());
        let thread = std::thread::spawn(move || {
            if let Err(e) = enter_netns(&netns) {
                let _ = ready_tx.send(Err(format!("setns into {netns}: {e}")));
                return;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let mut c = xds_testserver::Config::new(StateSource::Yaml(yaml));
                c.listen = listen;
                c.admin_listen = None;
                match Handle::start(c).await {
                    Ok(h) => {
                        let h = Arc::new(h);
                        let _ = ready_tx.send(Ok(h.clone()));
                        let _ = stopped.await;
                        drop(h);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("xds-testserver start: {e}")));
                    }
                }
            });
        });
        let handle = ready_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the control plane did not start within 10 s")
            .unwrap_or_else(|e| panic!("control plane: {e}"));
        ControlPlane {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
