use std::{
    path::Path,
    time::{Duration, Instant},
};

use tokio::io::BufReader;

use super::*;

async fn line_of(bytes: &[u8]) -> Result<Vec<u8>, RequestError> {
    read_request_line(&mut BufReader::new(bytes)).await
}

#[tokio::test]
async fn a_request_line_is_bounded() {
    assert_eq!(
        line_of(b"{\"op\":\"status\"}\nmore").await.unwrap(),
        b"{\"op\":\"status\"}"
    );
    // Without a newline the request is what came before the end.
    assert_eq!(
        line_of(b"{\"op\":\"stop\"}").await.unwrap(),
        b"{\"op\":\"stop\"}"
    );
    assert!(matches!(line_of(b"").await, Err(RequestError::Closed)));
    let exactly = vec![b' '; MAX_REQUEST];
    assert_eq!(
        line_of(&[&exactly[..], b"\n"].concat())
            .await
            .unwrap()
            .len(),
        MAX_REQUEST
    );
    let over = vec![b'x'; 10 * MAX_REQUEST];
    let error = line_of(&over).await.unwrap_err();
    assert!(matches!(error, RequestError::TooLong));
    assert!(error.to_string().contains("65536"), "{error}");
}

#[test]
fn decodes_requests_and_says_what_is_wrong() {
    assert!(matches!(
        decode_request(br#"{"op":"status"}"#),
        Ok(Request::Status)
    ));
    assert!(matches!(
        decode_request(b"{\"op\":\"stop\"}\r"),
        Ok(Request::Stop)
    ));
    match decode_request(br#"{"op":"upgrade","config":"/etc/x.toml"}"#) {
        Ok(Request::Upgrade { config, .. }) => assert_eq!(config, Path::new("/etc/x.toml")),
        other => panic!("{other:?}"),
    }
    for (line, says) in [
        (&b""[..], "empty request line"),
        (b"  ", "empty request line"),
        (b"{\"op\":\"explode\"}", "unknown variant `explode`"),
        (b"{\"op\":\"upgrade\"}", "missing field `config`"),
        (b"[1,2", "malformed control request"),
        (b"\xff\xfe", "malformed control request"),
    ] {
        let error = decode_request(line).unwrap_err().to_string();
        assert!(error.starts_with("malformed control request: "), "{error}");
        assert!(error.contains(says), "{error}");
    }
}

/// A connection that sends nothing is closed after REQUEST_TIMEOUT (paused
/// clock: no waiting) with a message that says so.
#[tokio::test(start_paused = true)]
async fn a_silent_connection_times_out() {
    let (client, server) = tokio::io::duplex(64);
    let (_evict, evicted) = oneshot::channel();
    let error = read_request(&mut BufReader::new(server), evicted)
        .await
        .unwrap_err();
    assert!(matches!(error, RequestError::Timeout));
    assert!(
        error.to_string().contains("no request within 10s"),
        "{error}"
    );
    drop(client);
}

/// Past the cap, a new connection takes the place of the oldest one that has
/// not sent its request; when every connection is busy, it is refused.
#[tokio::test]
async fn connections_are_capped_evicting_the_oldest_idle_one() {
    let connections = Connections::new(3);
    let mut admitted: Vec<Admitted> = (0..3).map(|_| connections.admit().unwrap()).collect();
    assert_eq!(connections.counts(), (3, 3));
    // The fourth evicts the first; places stay at 3.
    let fourth = connections.admit().unwrap();
    assert_eq!(connections.counts(), (3, 3));
    let mut first = admitted.remove(0);
    assert!(
        first.evicted.try_recv().is_ok(),
        "the oldest idle one is evicted"
    );
    assert!(admitted[0].evicted.try_recv().is_err());
    drop(first); // the evicted one ends: its place was handed over
    assert_eq!(connections.counts(), (3, 3));
    // All three remaining get their requests: nobody can be evicted.
    for a in admitted.iter().chain([&fourth]) {
        a.place.busy();
    }
    assert_eq!(connections.counts(), (3, 0));
    assert!(
        connections.admit().is_err(),
        "every connection is busy: refused"
    );
    drop(fourth);
    assert_eq!(connections.counts(), (2, 0));
    let fifth = connections.admit().unwrap();
    assert_eq!(connections.counts(), (3, 1));
    drop(admitted);
    drop(fifth);
    assert_eq!(connections.counts(), (0, 0));
}

/// A burst of connections, none of which sends anything, with the tasks
/// that serve them running only after the whole burst was admitted: places
/// never exceed the cap and the newest connections hold them.
#[tokio::test]
async fn a_burst_keeps_the_newest() {
    let connections = Connections::new(8);
    let mut tasks = Vec::new();
    for i in 0..100 {
        let admitted = connections.admit().unwrap();
        assert!(connections.counts().0 <= 8);
        tasks.push(tokio::spawn(async move {
            let Admitted { place, evicted } = admitted;
            let (_client, server) = tokio::io::duplex(64);
            let outcome = tokio::time::timeout(
                Duration::from_millis(50),
                read_request(&mut BufReader::new(server), evicted),
            )
            .await;
            drop(place);
            (i, matches!(outcome, Ok(Err(RequestError::Evicted))))
        }));
    }
    for task in tasks {
        let (i, evicted) = task.await.unwrap();
        assert_eq!(evicted, i < 92, "connection {i}");
    }
    assert_eq!(connections.counts(), (0, 0));
}

#[test]
fn rate_limited_log_counts_what_it_suppressed() {
    let mut log = RateLimitedLog::new(Duration::from_secs(3600));
    assert_eq!(log.allow(), Some(0));
    assert_eq!(log.allow(), None);
    assert_eq!(log.allow(), None);
    log.last = Some(Instant::now() - Duration::from_secs(7200));
    assert_eq!(log.allow(), Some(2));
}

/// Generated request lines (`fuzz`; `PROPTEST_CASES=N` for a longer run): the
/// framing and the decoder never panic, and every rejection is a clear error.
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    fn check_decode(line: &[u8]) {
        match decode_request(line) {
            Ok(request) => {
                // Anything accepted is a request the daemon can name.
                let again = serde_json::to_string(&request).unwrap();
                assert!(again.contains("\"op\""), "{again}");
            }
            Err(error) => {
                let text = error.to_string();
                assert!(text.starts_with("malformed control request: "), "{text}");
                assert!(text.len() > "malformed control request: ".len());
            }
        }
    }

    /// JSON-ish text made of the protocol's own pieces.
    fn request_like() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(&b"{"[..]),
            Just(&b"}"[..]),
            Just(&b"\"op\""[..]),
            Just(&b":"[..]),
            Just(&b","[..]),
            Just(&b"\"upgrade\""[..]),
            Just(&b"\"status\""[..]),
            Just(&b"\"stop\""[..]),
            Just(&b"\"reexec\""[..]),
            Just(&b"\"config\""[..]),
            Just(&b"\"binary\""[..]),
            Just(&b"\"/etc/x.toml\""[..]),
            Just(&b"\"\\u0000\""[..]),
            Just(&b"null"[..]),
            Just(&b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["[..]),
            Just(&b"1e999999"[..]),
            Just(&b"\xff"[..]),
            Just(&b"\r"[..]),
            Just(&b" "[..]),
        ];
        proptest::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #[test]
        fn arbitrary_bytes(line in proptest::collection::vec(any::<u8>(), 0..512)) {
            check_decode(&line);
        }

        #[test]
        fn request_like_lines(line in request_like()) {
            check_decode(&line);
        }

        /// Framing: whatever the stream holds, at most MAX_REQUEST bytes come
        /// back, without the newline, or a TooLong / Closed error.
        #[test]
        fn framing(
            body in proptest::collection::vec(any::<u8>(), 0..256),
            filler in 0..(2 * MAX_REQUEST),
            newline in any::<bool>(),
        ) {
            let mut stream = body.clone();
            stream.resize(body.len() + filler, b'a');
            if newline {
                stream.push(b'\n');
            }
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let result = runtime.block_on(read_request_line(&mut BufReader::new(&stream[..])));
            let first_line = stream.split(|&b| b == b'\n').next().unwrap();
            match result {
                Ok(line) => {
                    prop_assert!(line.len() <= MAX_REQUEST);
                    prop_assert_eq!(&line[..], first_line);
                }
                Err(RequestError::TooLong) => prop_assert!(first_line.len() > MAX_REQUEST),
                Err(RequestError::Closed) => prop_assert!(stream.is_empty()),
                Err(other) => prop_assert!(false, "unexpected {other}"),
            }
        }
    }
}
