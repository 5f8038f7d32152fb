//! Node-to-node RPC: authenticated TCP connections carrying framed, versioned messages.
//!
//! - [`auth`]: the handshake that proves both sides know the cluster secret;
//! - [`frame`]: length-delimited frames with a per-frame MAC;
//! - [`message`]: the request and reply types and their encoding;
//! - [`serve`]: the server loop; [`RpcClient`]: a multiplexed client.
//!
//! A connection carries many requests at once: each has an id, replies come back in
//! any order. A malformed, oversized or unauthenticated frame ends that connection
//! (and is logged); it never takes the node down.

pub mod auth;
pub mod frame;
pub mod message;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use csv_core::meta::NodeId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use auth::ClusterKey;
use frame::{FrameReader, FrameWriter};
use message::{Envelope, Reply, Request};

/// What the RPC layer failed to do.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("RPC I/O failed")]
    Io(#[source] std::io::Error),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("RPC handshake failed: {0}")]
    Handshake(String),
    #[error("peer not authenticated: {0}")]
    Unauthenticated(String),
    #[error("malformed RPC frame: {0}")]
    Malformed(String),
    #[error("RPC to {addr} timed out after {ms} ms")]
    Timeout { addr: String, ms: u64 },
    #[error("connection to {0} closed before the reply")]
    Disconnected(String),
    #[error("the cluster secret is too short ({0} bytes; at least 16 are required)")]
    WeakSecret(usize),
}

/// Serves one request. Must not block: long work belongs in the returned future.
pub type Handler =
    Arc<dyn Fn(NodeId, Request) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts connections until `cancel` fires; each connection is served by its own task.
pub async fn serve(
    listener: TcpListener,
    key: ClusterKey,
    me: NodeId,
    handler: Handler,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "rpc accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (key, handler, cancel) = (key.clone(), handler.clone(), cancel.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_conn(stream, addr, key, me, handler, cancel).await {
                match e {
                    RpcError::Unauthenticated(_) | RpcError::Handshake(_) => {
                        tracing::warn!(peer = %addr, error = %e, "refused RPC peer")
                    }
                    RpcError::Malformed(_) => {
                        tracing::warn!(peer = %addr, error = %e, "dropped RPC connection")
                    }
                    _ => tracing::debug!(peer = %addr, error = %e, "rpc connection ended"),
                }
            }
        });
    }
}

async fn serve_conn(
    mut stream: TcpStream,
    addr: SocketAddr,
    key: ClusterKey,
    me: NodeId,
    handler: Handler,
    cancel: CancellationToken,
) -> Result<(), RpcError> {
    stream.set_nodelay(true).map_err(RpcError::Io)?;
    let session = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        auth::server_handshake(&mut stream, &key, me),
    )
    .await
    .map_err(|_| RpcError::Handshake(format!("{addr} did not complete the handshake")))??;
    let peer = session.peer_node;
    let (rd, wr) = stream.into_split();
    let mut reader = FrameReader::new(rd, session.recv_key);
    let mut writer = FrameWriter::new(wr, session.send_key);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
    let conn_cancel = cancel.child_token();
    let writer_task = tokio::spawn({
        let conn_cancel = conn_cancel.clone();
        async move {
            while let Some(buf) = rx.recv().await {
                if writer.send(&buf).await.is_err() {
                    conn_cancel.cancel();
                    break;
                }
            }
        }
    });
    let result = loop {
        let frame = tokio::select! {
            _ = conn_cancel.cancelled() => break Ok(()),
            f = reader.next() => f,
        };
        let buf = match frame {
            Ok(Some(buf)) => buf,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let env: Envelope<Request> = match message::decode(&buf) {
            Ok(env) => env,
            Err(e) => break Err(e),
        };
        let (handler, tx) = (handler.clone(), tx.clone());
        tokio::spawn(async move {
            let reply = handler(peer, env.body).await;
            match message::encode(&Envelope {
                id: env.id,
                body: reply,
            }) {
                Ok(buf) => {
                    let _ = tx.send(buf).await;
                }
                Err(e) => tracing::error!(error = %e, "cannot encode rpc reply"),
            }
        });
    };
    drop(tx);
    conn_cancel.cancel();
    writer_task.abort();
    result
}

type Pending = Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

struct Conn {
    writer: Mutex<FrameWriter<tokio::net::tcp::OwnedWriteHalf>>,
    pending: Pending,
    alive: CancellationToken,
}

/// A client of one peer address. Connects lazily, reconnects after a failure, and
/// multiplexes concurrent calls over one connection.
pub struct RpcClient {
    addr: String,
    key: ClusterKey,
    me: NodeId,
    next_id: AtomicU64,
    conn: Mutex<Option<Arc<Conn>>>,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("addr", &self.addr)
            .finish()
    }
}

impl RpcClient {
    pub fn new(addr: impl Into<String>, key: ClusterKey, me: NodeId) -> Self {
        RpcClient {
            addr: addr.into(),
            key,
            me,
            next_id: AtomicU64::new(1),
            conn: Mutex::new(None),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn connection(&self, timeout: Duration) -> Result<Arc<Conn>, RpcError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref()
            && !c.alive.is_cancelled()
        {
            return Ok(c.clone());
        }
        let conn = tokio::time::timeout(timeout, self.connect())
            .await
            .map_err(|_| RpcError::Timeout {
                addr: self.addr.clone(),
                ms: timeout.as_millis() as u64,
            })??;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn connect(&self) -> Result<Arc<Conn>, RpcError> {
        let mut stream =
            TcpStream::connect(&self.addr)
                .await
                .map_err(|source| RpcError::Connect {
                    addr: self.addr.clone(),
                    source,
                })?;
        stream.set_nodelay(true).map_err(RpcError::Io)?;
        let session = auth::client_handshake(&mut stream, &self.key, self.me).await?;
        let (rd, wr) = stream.into_split();
        let pending: Pending = Arc::default();
        let alive = CancellationToken::new();
        let conn = Arc::new(Conn {
            writer: Mutex::new(FrameWriter::new(wr, session.send_key)),
            pending: pending.clone(),
            alive: alive.clone(),
        });
        let mut reader = FrameReader::new(rd, session.recv_key);
        let addr = self.addr.clone();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    _ = alive.cancelled() => break,
                    f = reader.next() => f,
                };
                let env = match frame.and_then(|f| match f {
                    Some(buf) => message::decode::<Reply>(&buf).map(Some),
                    None => Ok(None),
                }) {
                    Ok(Some(env)) => env,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(peer = %addr, error = %e, "dropping rpc connection");
                        break;
                    }
                };
                let waiter = pending.lock().ok().and_then(|mut p| p.remove(&env.id));
                if let Some(w) = waiter {
                    let _ = w.send(env.body);
                }
            }
            alive.cancel();
            if let Ok(mut p) = pending.lock() {
                p.clear();
            }
        });
        Ok(conn)
    }

    /// Sends `req` and waits up to `timeout` for its reply (connecting if needed).
    pub async fn call(&self, req: Request, timeout: Duration) -> Result<Reply, RpcError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let conn = self.connection(timeout).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = conn.pending.lock() {
            p.insert(id, tx);
        }
        let buf = message::encode(&Envelope { id, body: req })?;
        let sent = {
            let mut w = conn.writer.lock().await;
            w.send(&buf).await
        };
        if let Err(e) = sent {
            conn.alive.cancel();
            return Err(e);
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(RpcError::Disconnected(self.addr.clone())),
            Err(_) => {
                if let Ok(mut p) = conn.pending.lock() {
                    p.remove(&id);
                }
                Err(RpcError::Timeout {
                    addr: self.addr.clone(),
                    ms: timeout.as_millis() as u64,
                })
            }
        }
    }

    /// Drops the current connection (the next call reconnects).
    pub async fn reset(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            c.alive.cancel();
        }
    }
}

#[cfg(test)]
mod tests;
