//! RPC tests over real loopback sockets: authentication, malformed input, multiplexing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::auth::{self, ClusterKey};
use super::frame::{FrameReader, FrameWriter};
use super::message::{NodeStatus, Reply, Request};
use super::{Handler, RpcClient, RpcError, serve};

fn key(s: &str) -> ClusterKey {
    ClusterKey::from_secret(s.as_bytes()).unwrap()
}

fn status(id: u64) -> NodeStatus {
    NodeStatus {
        id,
        leader: Some(1),
        term: 7,
        last_applied: Some(3),
        voters: vec![1],
        learners: vec![],
        members: vec![(1, "x".into())],
        session: None,
        fenced: true,
    }
}

/// A server that answers `Status` after an optional delay, counting calls.
async fn server(k: ClusterKey) -> (String, CancellationToken, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let handler: Handler = Arc::new(move |peer, req| {
        let calls = c2.clone();
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            match req {
                Request::Leave { node } => {
                    // Used as "sleep node ms" to test out-of-order replies.
                    tokio::time::sleep(Duration::from_millis(node)).await;
                    Reply::Status(status(peer))
                }
                _ => Reply::Status(status(peer)),
            }
        })
    });
    let cancel = CancellationToken::new();
    tokio::spawn(serve(l, k, 1, handler, cancel.clone()));
    (addr, cancel, calls)
}

#[tokio::test]
async fn authenticated_call_round_trips_and_server_sees_caller_id() {
    let k = key("0123456789abcdef-secret");
    let (addr, _c, _) = server(k.clone()).await;
    let client = RpcClient::new(addr, k, 42);
    let r = client
        .call(Request::Status, Duration::from_secs(5))
        .await
        .unwrap();
    match r {
        Reply::Status(s) => assert_eq!(s.id, 42, "server must see the authenticated peer id"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn wrong_secret_is_refused_and_server_keeps_serving() {
    let k = key("0123456789abcdef-secret");
    let (addr, _c, calls) = server(k.clone()).await;
    let intruder = RpcClient::new(addr.clone(), key("another-secret-of-16+"), 9);
    let err = intruder
        .call(Request::Status, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Unauthenticated(_)), "{err:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "no request may reach the handler"
    );
    let good = RpcClient::new(addr, k, 2);
    assert!(
        good.call(Request::Status, Duration::from_secs(5))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn server_refuses_a_client_with_a_wrong_proof() {
    let k = key("0123456789abcdef-secret");
    let (addr, _c, calls) = server(k.clone()).await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut hello = Vec::from(auth::MAGIC);
    hello.extend_from_slice(&auth::VERSION.to_be_bytes());
    hello.extend_from_slice(&7u64.to_be_bytes());
    hello.extend_from_slice(&[9u8; 32]);
    s.write_all(&hello).await.unwrap();
    let mut theirs = [0u8; 50 + 32];
    s.read_exact(&mut theirs).await.unwrap();
    s.write_all(&[0u8; 32]).await.unwrap(); // not a proof of the secret
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the server must close without accepting");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn short_secret_is_rejected() {
    assert!(matches!(
        ClusterKey::from_secret(b"  short \n"),
        Err(RpcError::WeakSecret(5))
    ));
}

#[tokio::test]
async fn garbage_and_forged_frames_drop_only_that_connection() {
    let k = key("0123456789abcdef-secret");
    let (addr, _c, calls) = server(k.clone()).await;

    // 1. Not our protocol at all.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n-------------------------------")
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "server must close a non-csvd peer without answering");

    // 2. A good handshake, then a frame with a wrong MAC, then an oversized length.
    for bad in [&b"\x00\x00\x00\x20"[..], &b"\xff\xff\xff\xff"[..]] {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        auth::client_handshake(&mut s, &k, 5).await.unwrap();
        s.write_all(bad).await.unwrap();
        s.write_all(&[0u8; 32]).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "server must drop a connection sending a bad frame");
    }

    // 3. A well-authenticated frame that is not a valid message.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let sess = auth::client_handshake(&mut s, &k, 5).await.unwrap();
    let (rd, wr) = s.into_split();
    let mut w = FrameWriter::new(wr, sess.send_key);
    w.send(&[1, 0xff, 0xff, 0xff]).await.unwrap();
    let mut r = FrameReader::new(rd, sess.recv_key);
    let got = tokio::time::timeout(Duration::from_secs(5), r.next())
        .await
        .unwrap();
    assert!(matches!(got, Ok(None) | Err(_)), "{got:?}");

    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let good = RpcClient::new(addr, k, 2);
    assert!(
        good.call(Request::Status, Duration::from_secs(5))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn calls_are_multiplexed_and_replies_may_come_out_of_order() {
    let k = key("0123456789abcdef-secret");
    let (addr, _c, _) = server(k.clone()).await;
    let client = Arc::new(RpcClient::new(addr, k, 3));
    let slow = {
        let c = client.clone();
        tokio::spawn(async move {
            c.call(Request::Leave { node: 3000 }, Duration::from_secs(5))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = std::time::Instant::now();
    client
        .call(Request::Status, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "a fast call must not wait behind a slow one"
    );
    slow.await.unwrap().unwrap();
}

#[tokio::test]
async fn timed_out_call_does_not_poison_the_next_one() {
    let k = key("0123456789abcdef-secret");
    let (addr, _c, _) = server(k.clone()).await;
    let client = RpcClient::new(addr, k, 3);
    let err = client
        .call(Request::Leave { node: 300 }, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Timeout { .. }));
    // The late reply to the first call must not be taken as this call's reply.
    match client
        .call(Request::Status, Duration::from_secs(5))
        .await
        .unwrap()
    {
        Reply::Status(s) => assert_eq!(s.id, 3),
        other => panic!("{other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn frame_reader_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let k = key("0123456789abcdef-secret");
            let sess_key = {
                // Any MAC key will do: random input must be refused, not crash.
                let (mut a, mut b) = tokio::io::duplex(1024);
                let kk = k.clone();
                let srv = tokio::spawn(async move { auth::server_handshake(&mut b, &kk, 1).await.map(|s| s.recv_key) });
                let _ = auth::client_handshake(&mut a, &k, 2).await.unwrap();
                srv.await.unwrap().unwrap()
            };
            let mut r = FrameReader::new(&bytes[..], sess_key);
            while let Ok(Some(_)) = r.next().await {}
        });
    }

    #[test]
    fn message_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = super::message::decode::<Request>(&bytes);
        let _ = super::message::decode::<Reply>(&bytes);
    }
}
