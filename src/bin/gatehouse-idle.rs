//! `gatehouse-idle` — opens N idle MQTT 3.1.1 connections to a broker or gateway and holds them,
//! for measuring a server's memory per idle agent (`scripts/bench-conns.sh`).
//!
//! Each connection: TCP (or TLS with a client certificate), CONNECT with client id
//! `<prefix><i, 6 digits>`, a successful CONNACK, then nothing until the tool is stopped. Up to
//! `--parallel` connections are set up at once. Connections are spread over the source addresses
//! 127.0.0.1, 127.0.0.2, ... (`--sources`), so more than one source port range's worth can be
//! opened to a loopback server.
//!
//! Prints `READY <n> in <secs>s` once every connection has its CONNACK, then holds them until
//! SIGTERM or SIGINT. Exits non-zero, naming the connection and why, if any fails.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;

#[derive(Parser, Debug)]
#[command(
    name = "gatehouse-idle",
    version,
    about = "Open N idle MQTT connections (CONNECT, CONNACK) and hold them until SIGTERM"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: Ipv4Addr,
    #[arg(long)]
    port: u16,
    /// How many connections.
    #[arg(short, default_value_t = 1000)]
    n: usize,
    /// Connection set-ups in flight at once.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    /// Loopback source addresses to spread connections over (127.0.0.1 ..).
    #[arg(long, default_value_t = 1)]
    sources: u8,
    #[arg(long, default_value = "idle-")]
    prefix: String,
    #[arg(long, default_value_t = 600)]
    keep_alive: u16,
    /// TLS: the CA that signed the server's certificate (PEM).
    #[arg(long)]
    cafile: Option<PathBuf>,
    /// TLS client certificate (PEM), with `--key`.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// CONNECT (MQTT 3.1.1, clean session), encoded by rumqttc's `mqttbytes`.
fn connect_packet(client_id: &str, keep_alive: u16) -> Result<bytes::BytesMut> {
    use rumqttc::mqttbytes::v4::{Connect, Packet};
    let mut connect = Connect::new(client_id);
    connect.keep_alive = keep_alive;
    let mut packet = bytes::BytesMut::new();
    Packet::Connect(connect)
        .write(&mut packet, usize::MAX)
        .map_err(|e| anyhow::anyhow!("encoding CONNECT: {e}"))?;
    Ok(packet)
}

fn tls_connector(args: &Args) -> Result<Option<tokio_rustls::TlsConnector>> {
    let Some(cafile) = &args.cafile else {
        return Ok(None);
    };
    let client = args.cert.as_deref().zip(args.key.as_deref());
    let config = gatehouse::tls::client_config(cafile, client)?;
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(config))))
}

async fn open(
    args: &Args,
    tls: Option<&tokio_rustls::TlsConnector>,
    i: usize,
) -> Result<Box<dyn Stream>> {
    let source = Ipv4Addr::new(127, 0, 0, 1 + (i % args.sources.max(1) as usize) as u8);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let tcp = socket
        .connect(SocketAddr::new(IpAddr::V4(args.host), args.port))
        .await
        .with_context(|| format!("TCP connect from {source}"))?;
    let mut stream: Box<dyn Stream> = match tls {
        Some(connector) => {
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            Box::new(
                connector
                    .connect(name, tcp)
                    .await
                    .context("TLS handshake")?,
            )
        }
        None => Box::new(tcp),
    };
    let client_id = format!("{}{i:06}", args.prefix);
    stream
        .write_all(&connect_packet(&client_id, args.keep_alive)?)
        .await?;
    let mut ack = [0u8; 4];
    stream.read_exact(&mut ack).await.context("CONNACK")?;
    if ack[0] != 0x20 || ack[3] != 0 {
        bail!("CONNACK {ack:02x?}");
    }
    Ok(stream)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let tls = tls_connector(&args)?.map(Arc::new);
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.parallel.max(1)));
    let mut tasks = Vec::with_capacity(args.n);
    for i in 0..args.n {
        let (args, tls, gate) = (args.clone(), tls.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            let mut last = None;
            // A server's listen backlog may overflow under the burst: retry briefly.
            for _ in 0..50 {
                match open(&args, tls.as_deref(), i).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(last.expect("tried").context(format!("connection {i}")))
        }));
    }
    let mut held = Vec::with_capacity(args.n);
    for task in tasks {
        held.push(task.await??);
    }
    println!(
        "READY {} in {:.1}s",
        held.len(),
        started.elapsed().as_secs_f64()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(held);
    Ok(())
}
