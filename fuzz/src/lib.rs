//! What the fuzz targets share: the real keyd, certd and identityd HTTP services, built once
//! per process over a scratch state directory (no HSM, no TPM, no cloud), and one in-memory
//! HTTP/1 exchange with them through `aziot_ipc::server`'s own connection and pipeline.
//!
//! Time is paused (tokio `test-util`): the runtime's clock jumps ahead whenever every task is
//! waiting, so the body deadline (408) costs nothing and "the server has answered everything it
//! can" is the moment a long sleep completes.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use aziot_ipc::server::{serve_connection, Service, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The caller uids an input may pick: root, a principal with some IDs, a stranger.
pub const UIDS: [u32; 3] = [0, 1000, 4242];

/// The services under test.
pub struct Services {
    pub keyd: Arc<aziot_keyd::api::Api>,
    pub certd: Arc<aziot_certd::api::Api>,
    pub identityd: Arc<aziot_identityd::api::Api>,
    /// Kept for the process's lifetime (the state directories live here).
    _scratch: Scratch,
}

/// A scratch directory removed at exit (best effort).
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch() -> std::path::PathBuf {
    let base = std::env::var_os("AZIOT_FUZZ_SCRATCH").map_or_else(std::env::temp_dir, Into::into);
    let dir = base.join(format!("aziot-fuzz-state.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["keyd", "certd", "identityd"] {
        std::fs::create_dir_all(dir.join(sub)).expect("the scratch state directory");
    }
    dir
}

fn open_dir(path: &std::path::Path) -> std::os::fd::OwnedFd {
    std::fs::File::open(path).expect("a scratch directory").into()
}

impl Services {
    /// The services, built on first use.
    pub fn get() -> &'static Services {
        static SERVICES: OnceLock<Services> = OnceLock::new();
        SERVICES.get_or_init(Services::build)
    }

    fn build() -> Services {
        openssl::init();
        let dir = scratch();
        let nowhere = dir.join("no-such.sock");

        let keyd_config: aziot_keyd::config::Config = toml::from_str(&format!(
            "[aziot_keys]\nhomedir_path = {:?}\n[[principal]]\nuid = 1000\nkeys = [\"a*\", \"device-id\"]\n",
            dir.join("keyd")
        ))
        .expect("the keyd config");
        let backend = aziot_keyd::backend(&keyd_config, aziot_keyd::HandedDirs::default()).expect("the keyd backend");
        let keyd = aziot_keyd::api::Api::new(backend, aziot_ipc::principal::Principals::new(&keyd_config.principal));

        let certd_config = aziot_certd::config_from_text(&format!(
            "homedir_path = {:?}\n[[principal]]\nuid = 1000\ncerts = [\"a*\"]\n\
             [cert_issuance.self]\nmethod = \"self_signed\"\n[cert_issuance.issued]\nmethod = \"local_ca\"\n\
             [cert_issuance.local_ca]\ncert = \"ca\"\npk = \"ca\"\n",
            dir.join("certd")
        ))
        .expect("the certd config");
        let store = aziot_certd::store::Store::new(
            std::os::fd::AsFd::as_fd(&open_dir(&dir.join("certd"))),
            certd_config.preloaded.clone(),
            Default::default(),
        )
        .expect("the certd store");
        let certd = aziot_certd::api::Api::new(&certd_config, Arc::new(store), &nowhere, None);

        let identityd_config = aziot_identityd::config_from_text(&format!(
            "hostname = \"fuzz-host\"\nhomedir = {:?}\ncloud_retries = 0\n\
             [provisioning]\nsource = \"manual\"\niothub_hostname = \"hub.example\"\ndevice_id = \"dev\"\n\
             [provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"device-id\"\n\
             [localid]\ndomain = \"example.local\"\n\
             [[principal]]\nuid = 1000\nname = \"amod\"\nidtype = [\"module\", \"local\"]\n",
            dir.join("identityd")
        ))
        .expect("the identityd config");
        let state = aziot_identityd::state::State::new(open_dir(&dir.join("identityd")));
        let core = aziot_identityd::identity::Core::new(identityd_config, state, &nowhere, &nowhere, None);
        let identityd = aziot_identityd::api::Api::new(Arc::new(core));
        identityd.set_ready();

        Services { keyd: Arc::new(keyd), certd: Arc::new(certd), identityd: Arc::new(identityd), _scratch: Scratch(dir) }
    }
}

/// The server side of an in-memory connection: reads `input` in pieces of at most `chunk`
/// bytes, then waits forever (a client that sent everything and waits for the answers);
/// everything written is kept.
struct Pipe {
    input: Vec<u8>,
    at: usize,
    chunk: usize,
    output: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Pipe {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at >= self.input.len() {
            // No waker kept: nothing will ever arrive.
            return Poll::Pending;
        }
        let n = (self.input.len() - self.at).min(self.chunk).min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.input[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.output.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The runtime every exchange runs on: one thread, paused clock.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("the fuzz runtime")
    })
}

/// Sends `input` (one or more pipelined requests, read `chunk` bytes at a time) to `service`
/// as `uid` and returns every byte the server wrote until it waits for more input.
pub fn exchange<S: Service>(service: &Arc<S>, uid: u32, chunk: usize, input: &[u8]) -> Vec<u8> {
    let output = Arc::new(Mutex::new(Vec::new()));
    let pipe = Pipe { input: input.to_vec(), at: 0, chunk: chunk.max(1), output: Arc::clone(&output) };
    let config = ServerConfig {
        max_requests: 10,
        // small, so that 413 is reachable
        body_limit: 4096,
        body_timeout: Duration::from_secs(5),
        threads: 1,
    };
    let service = Arc::clone(service);
    runtime().block_on(async move {
        // Ends when every task waits (the clock then jumps to this deadline) or the connection ends.
        let serve = serve_connection(service, config, pipe, uid, 4242);
        let _ = tokio::time::timeout(Duration::from_secs(3600), serve).await;
    });
    let out = std::mem::take(&mut *output.lock().unwrap_or_else(|p| p.into_inner()));
    out
}

/// Checks what a server wrote: nothing, or HTTP/1.x responses (hyper answers an HTTP/1.0
/// request in kind).
pub fn check_responses(out: &[u8]) {
    if out.is_empty() {
        return;
    }
    assert!(out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "), "the server wrote something that is not an HTTP/1.x response: {:?}", String::from_utf8_lossy(&out[..out.len().min(200)]));
}
