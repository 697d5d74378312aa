//! The echo protocol of the example workers (docs/echo-protocol.md):
//! reply = request bytes verbatim + an 8-byte trailer
//! `generation: u32 LE, worker: u16 LE, socket: u16 LE`.
//! Requests start with an 8-byte sequence number (u64 LE).

/// Size of the sequence number at the start of every request.
pub const SEQ_LEN: usize = 8;
/// Size of the trailer the echo workers append.
pub const TRAILER_LEN: usize = 8;

/// Who answered a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Trailer {
    pub generation: u32,
    pub worker: u16,
    /// Position of the receiving fd among the worker's fds for the listener.
    pub socket: u16,
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut t = [0u8; TRAILER_LEN];
        t[0..4].copy_from_slice(&self.generation.to_le_bytes());
        t[4..6].copy_from_slice(&self.worker.to_le_bytes());
        t[6..8].copy_from_slice(&self.socket.to_le_bytes());
        t
    }

    pub fn decode(t: &[u8; TRAILER_LEN]) -> Trailer {
        Trailer {
            generation: u32::from_le_bytes([t[0], t[1], t[2], t[3]]),
            worker: u16::from_le_bytes([t[4], t[5]]),
            socket: u16::from_le_bytes([t[6], t[7]]),
        }
    }
}

/// Parses a reply to a request of `request_len` bytes: the sequence number and the trailer.
/// `None` when the length is not exactly request + trailer (not an echo of our request).
pub fn parse_reply(reply: &[u8], request_len: usize) -> Option<(u64, Trailer)> {
    if request_len < SEQ_LEN || reply.len() != request_len + TRAILER_LEN {
        return None;
    }
    let seq = u64::from_le_bytes(reply[..SEQ_LEN].try_into().ok()?);
    let trailer = Trailer::decode(reply[request_len..].try_into().ok()?);
    Some((seq, trailer))
}

/// Builds the reply an echo worker sends for `request`.
pub fn make_reply(request: &[u8], trailer: Trailer) -> Vec<u8> {
    let mut r = Vec::with_capacity(request.len() + TRAILER_LEN);
    r.extend_from_slice(request);
    r.extend_from_slice(&trailer.encode());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailer_round_trips() {
        let t = Trailer {
            generation: 7,
            worker: 3,
            socket: 1,
        };
        let mut req = 42u64.to_le_bytes().to_vec();
        req.resize(32, 0xab);
        let reply = make_reply(&req, t);
        assert_eq!(parse_reply(&reply, 32), Some((42, t)));
        assert_eq!(parse_reply(&reply, 31), None);
    }
}
