//! Checks 7–8 (version, clock) and 21–24 (TCP + TLS handshakes with the IoT Hub and DPS
//! endpoints) (spec aziotctl.md §4.4).
//!
//! Only endpoints that the configs or the command line name are contacted: the hub and DPS
//! hosts of identityd's config (or `--iothub-hostname`), `--proxy-uri`, `--ntp-server`.
//! Without `--expected-aziot-version` / `--ntp-server`, `aziot-version` / `host-local-time`
//! are `ignored`: upstream would contact aka.ms and pool.ntp.org (docs/compatibility.md).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::{Ctx, Outcome};

/// The version this build reports (the workspace version, upstream's version line).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub fn aziot_version(ctx: &mut Ctx<'_>) -> Outcome {
    ctx.set("actual_version", VERSION);
    match ctx.opts.expected_aziot_version.clone() {
        Some(expected) => {
            ctx.set("expected_version", expected.clone());
            if expected == VERSION {
                Outcome::Ok
            } else {
                Outcome::Warning(vec![format!(
                    "Installed aziot-identity-service package has version {VERSION} but {expected} is the latest stable version available.\nPlease see https://aka.ms/aziot-update-runtime for update instructions."
                )])
            }
        }
        None => {
            ctx.set("expected_version", Value::Null);
            Outcome::Ignored
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum NtpError {
    #[error("could not resolve {0}")]
    Resolve(String, #[source] std::io::Error),
    #[error("{0} resolves to no IPv4 address")]
    NoIpv4(String),
    #[error("could not send the SNTP request")]
    Send(#[source] std::io::Error),
    #[error("could not receive the SNTP response")]
    Receive(#[source] std::io::Error),
    #[error("malformed SNTP response: {0}")]
    Malformed(&'static str),
}

/// Seconds between 1900-01-01 (NTP era 0) and 1970-01-01.
const NTP_UNIX_OFFSET: f64 = 2_208_988_800.0;

fn ntp_time(bytes: &[u8]) -> f64 {
    let secs = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let frac = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    f64::from(secs) - NTP_UNIX_OFFSET + f64::from(frac) / 4_294_967_296.0
}

fn unix_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One SNTP (RFC 4330) exchange: the clock offset in seconds.
fn sntp_offset(server: &str) -> Result<f64, NtpError> {
    let addr = server
        .to_socket_addrs()
        .map_err(|e| NtpError::Resolve(server.to_owned(), e))?
        .find(std::net::SocketAddr::is_ipv4)
        .ok_or_else(|| NtpError::NoIpv4(server.to_owned()))?;
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(NtpError::Send)?;
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(NtpError::Send)?;
    socket
        .set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(NtpError::Send)?;
    let mut request = [0u8; 48];
    request[0] = 0x1b; // LI 0, version 3, mode 3 (client)
    let t1 = unix_f64();
    socket.send_to(&request, addr).map_err(NtpError::Send)?;
    let mut response = [0u8; 48];
    let (n, _) = socket.recv_from(&mut response).map_err(NtpError::Receive)?;
    let t4 = unix_f64();
    if n < 48 {
        return Err(NtpError::Malformed("shorter than 48 bytes"));
    }
    if response[0] & 0x07 != 4 {
        return Err(NtpError::Malformed("not a server response (mode 4)"));
    }
    let (t2, t3) = (ntp_time(&response[32..40]), ntp_time(&response[40..48]));
    if response[40..48].iter().all(|b| *b == 0) {
        return Err(NtpError::Malformed("no transmit timestamp"));
    }
    Ok(((t2 - t1) + (t3 - t4)) / 2.0)
}

pub fn local_time(ctx: &mut Ctx<'_>) -> Outcome {
    ctx.set("offset", Value::Null);
    let Some(server) = ctx.opts.ntp_server.clone() else {
        return Outcome::Ignored;
    };
    match sntp_offset(&server) {
        Ok(offset) => {
            let abs = offset.abs().round() as i64;
            ctx.set("offset", abs);
            if abs >= 10 {
                Outcome::Warning(vec![
                    "Time on the device is out of sync with the NTP server. This may cause problems connecting to IoT Hub.\nPlease ensure time on device is accurate, for example by installing an NTP daemon.".to_owned(),
                ])
            } else {
                Outcome::Ok
            }
        }
        Err(e) => {
            let unreachable = match &e {
                NtpError::Resolve(..) | NtpError::NoIpv4(_) => true,
                NtpError::Send(io) | NtpError::Receive(io) => {
                    matches!(
                        io.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) || io.raw_os_error() == Some(libc::ECONNREFUSED)
                }
                NtpError::Malformed(_) => false,
            };
            let lines = super::with_causes("Could not query NTP server", &e);
            if unreachable {
                Outcome::Warning(lines)
            } else {
                Outcome::Error(lines)
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not resolve {0}")]
    Resolve(String, #[source] std::io::Error),
    #[error("could not connect to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("the proxy refused to connect: {0}")]
    Proxy(String),
    #[error("invalid proxy URI {0:?}")]
    ProxyUri(String),
    #[error("could not set up TLS")]
    Tls(#[from] openssl::error::ErrorStack),
    #[error("TLS handshake failed")]
    Handshake(#[source] openssl::ssl::HandshakeError<TcpStream>),
    #[error("timed out")]
    TimedOut,
}

fn connect_tcp(host: &str, port: u16, deadline: Instant) -> Result<TcpStream, ConnectError> {
    let target = format!("{host}:{port}");
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| ConnectError::Resolve(host.to_owned(), e))?
        .collect();
    let mut last = None;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ConnectError::TimedOut);
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return Err(ConnectError::TimedOut)
            }
            Err(e) => last = Some(e),
        }
    }
    Err(ConnectError::Connect(
        target,
        last.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address")),
    ))
}

/// A tunnel to `host:port` through an HTTP proxy (`http://[user:pass@]proxy[:port]`).
fn connect_via_proxy(
    proxy: &str,
    host: &str,
    port: u16,
    deadline: Instant,
) -> Result<TcpStream, ConnectError> {
    let bad = || ConnectError::ProxyUri(proxy.to_owned());
    let url = url::Url::parse(proxy).map_err(|_| bad())?;
    let proxy_host = url
        .host_str()
        .ok_or_else(bad)?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let proxy_port = url.port_or_known_default().unwrap_or(80);
    let mut stream = connect_tcp(&proxy_host, proxy_port, deadline)?;
    let io = |e| ConnectError::Connect(format!("{proxy_host}:{proxy_port}"), e);
    stream
        .set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .map_err(io)?;
    let mut request = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n");
    if !url.username().is_empty() {
        use base64::Engine as _;
        let creds = format!("{}:{}", url.username(), url.password().unwrap_or(""));
        let creds = aziot_ipc::endpoint::percent_decode(&creds).unwrap_or(creds);
        request.push_str(&format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(creds)
        ));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(io)?);
    let mut status = String::new();
    reader.read_line(&mut status).map_err(io)?;
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(ConnectError::Proxy(status.trim().to_owned()));
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(io)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    // Nothing may follow the proxy's header before the server speaks.
    let mut rest = Vec::new();
    let _ = reader.get_mut().set_nonblocking(true);
    let _ = reader.read_to_end(&mut rest);
    let _ = stream.set_nonblocking(false);
    Ok(stream)
}

/// TCP (directly, or through `proxy`) + a verified TLS handshake with `host:port`, within
/// `timeout`.
pub fn tls_handshake(
    host: &str,
    port: u16,
    proxy: Option<&str>,
    timeout: Duration,
) -> Result<(), ConnectError> {
    let deadline = Instant::now() + timeout;
    let stream = match proxy {
        Some(p) => connect_via_proxy(p, host, port, deadline)?,
        None => connect_tcp(host, port, deadline)?,
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let _ = stream.set_read_timeout(Some(left));
    let _ = stream.set_write_timeout(Some(left));
    // The system trust store (SslConnector sets the default verify paths; OpenSSL honours
    // SSL_CERT_FILE / SSL_CERT_DIR) and host name verification.
    let connector =
        openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())?.build();
    match connector.connect(host, stream) {
        Ok(_) => Ok(()),
        Err(e) => {
            if Instant::now() >= deadline {
                return Err(ConnectError::TimedOut);
            }
            Err(ConnectError::Handshake(e))
        }
    }
}

/// The `host` part of `host[:port]` (identityd's hub and gateway names may carry a port).
fn host_only(name: &str) -> &str {
    match name.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => h,
        _ => name,
    }
}

fn handshake_outcome(
    host: &str,
    port: u16,
    proxy: Option<&str>,
    timeout_secs: u64,
    nested: bool,
) -> Outcome {
    match tls_handshake(host, port, proxy, Duration::from_secs(timeout_secs)) {
        Ok(()) => Outcome::Ok,
        Err(ConnectError::TimedOut) => Outcome::error(format!(
            "Failed to do TLS Handshake, Connection Attempt Timed out in {timeout_secs} Seconds"
        )),
        Err(e) => {
            let mut lines = super::with_causes(
                format!("Could not connect to {host} : could not complete TLS handshake"),
                &e,
            );
            if nested {
                lines.insert(
                    0,
                    format!(
                        "Make sure the parent device {host} is reachable and that its root CA certificate is installed in the system trust store (for example with update-ca-certificates)."
                    ),
                );
            }
            Outcome::Error(lines)
        }
    }
}

/// The hub to test (§4.4 checks 21–23): `Ok((host, nested))` or the check's outcome.
fn hub(ctx: &Ctx<'_>) -> Result<(String, bool), Outcome> {
    use aziot_identityd::config::Source;
    if let Some(h) = &ctx.opts.iothub_hostname {
        return Ok((h.clone(), false));
    }
    let Some(config) = &ctx.identityd else {
        return Err(Outcome::Skipped);
    };
    match &config.provisioning.source {
        Source::Manual {
            iothub_hostname, ..
        } => Ok(match &config.provisioning.local_gateway_hostname {
            Some(gw) => (gw.clone(), true),
            None => (iothub_hostname.clone(), false),
        }),
        Source::Dps { .. } => {
            if config.provisioning.local_gateway_hostname.is_some() {
                return Err(Outcome::Ignored);
            }
            if let Some(Source::Manual {
                iothub_hostname, ..
            }) = ctx.prev_identityd.as_ref().map(|p| &p.provisioning.source)
            {
                return Ok((iothub_hostname.clone(), false));
            }
            // The hub DPS assigned, saved by identityd (recommendation of §4.4).
            let saved = std::fs::read_to_string(config.homedir.join("device_info"))
                .ok()
                .and_then(|t| t.parse::<toml::Table>().ok())
                .and_then(|t| {
                    t.get("hub_name")
                        .and_then(|h| h.as_str())
                        .map(str::to_owned)
                });
            match saved {
                Some(h) => Ok((h, false)),
                None => Err(Outcome::Warning(vec![
                    "Could not retrieve iothub_hostname from provisioning file.\nPlease specify the backing IoT Hub name using --iothub-hostname switch if you have that information.\nSince no hostname is provided, all hub connectivity tests will be skipped."
                        .to_owned(),
                ])),
            }
        }
        Source::None => Err(Outcome::Ignored),
    }
}

fn timeout_secs(ctx: &Ctx<'_>) -> u64 {
    ctx.identityd
        .as_ref()
        .map_or(aziot_identityd::config::MIN_CLOUD_TIMEOUT_SEC, |c| {
            c.cloud_timeout_sec
        })
}

fn iothub(ctx: &mut Ctx<'_>, port: u16) -> Outcome {
    ctx.set("port_number", port);
    ctx.set("iothub_hostname", Value::Null);
    // The proxy is used for port 443 only.
    let proxy = if port == 443 {
        ctx.opts.proxy_uri.clone()
    } else {
        None
    };
    ctx.set("proxy", proxy.clone().map_or(Value::Null, Value::from));
    let (name, nested) = match hub(ctx) {
        Ok(h) => h,
        Err(o) => return o,
    };
    ctx.set("iothub_hostname", name.clone());
    handshake_outcome(
        host_only(&name),
        port,
        proxy.as_deref(),
        timeout_secs(ctx),
        nested,
    )
}

pub fn iothub_amqp(ctx: &mut Ctx<'_>) -> Outcome {
    iothub(ctx, 5671)
}

pub fn iothub_https(ctx: &mut Ctx<'_>) -> Outcome {
    iothub(ctx, 443)
}

pub fn iothub_mqtt(ctx: &mut Ctx<'_>) -> Outcome {
    iothub(ctx, 8883)
}

pub fn dps_endpoint(ctx: &mut Ctx<'_>) -> Outcome {
    use aziot_identityd::config::Source;
    ctx.set("dps_endpoint", Value::Null);
    ctx.set("dps_hostname", Value::Null);
    let proxy = ctx.opts.proxy_uri.clone();
    ctx.set("proxy", proxy.clone().map_or(Value::Null, Value::from));
    let Some(config) = &ctx.identityd else {
        return Outcome::Skipped;
    };
    let Source::Dps {
        global_endpoint, ..
    } = &config.provisioning.source
    else {
        return Outcome::Ignored;
    };
    let endpoint = global_endpoint.clone();
    ctx.set("dps_endpoint", endpoint.clone());
    let parsed = url::Url::parse(&endpoint).ok();
    let Some(host) = parsed
        .as_ref()
        .and_then(|u| u.host_str())
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
    else {
        return Outcome::error(
            "URL specified in provisioning.global_endpoint does not have a host",
        );
    };
    let port = parsed
        .as_ref()
        .and_then(url::Url::port_or_known_default)
        .unwrap_or(443);
    ctx.set("dps_hostname", host.clone());
    // Upstream has no timeout here; identityd's cloud timeout bounds it (a hung check helps nobody).
    handshake_outcome(&host, port, proxy.as_deref(), timeout_secs(ctx), false)
}
