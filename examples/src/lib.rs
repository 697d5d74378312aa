//! Example workers for the supervisor, and the echo protocol they speak.
//!
//! The workers themselves are `src/bin/echo-worker.rs` (Rust, on worker-sdk)
//! and `python-worker/echo_worker.py` (Python, only the socket-activation
//! protocol). This library holds what both sides of the echo protocol need,
//! so the worker, the tests and the load generator encode and decode it the
//! same way.

#![deny(unsafe_code)]

/// The echo protocol (docs/echo-protocol.md).
///
/// A reply is the request, byte for byte, followed by an 8-byte trailer that
/// says who answered: which generation, which worker of it, and which of the
/// worker's sockets. That is what lets a test see *where* each datagram went
/// during an upgrade (old generation, new one, or lost), not just whether it
/// was answered.
///
/// Test traffic puts a sequence number (u64, little-endian) in the first 8
/// bytes of each request, so replies can be matched to requests.
pub mod echo {
    /// Bytes the trailer adds to every reply.
    pub const TRAILER_LEN: usize = 8;

    /// Who answered a request.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct Trailer {
        /// `SUPERVISOR_GENERATION`, 0 when unset (run by hand).
        pub generation: u32,
        /// `SUPERVISOR_WORKER`, 0 when unset.
        pub worker: u16,
        /// Position of the receiving socket among the worker's sockets for
        /// that listener (0-based, in fd order).
        pub socket: u16,
    }

    impl Trailer {
        /// The wire form: generation u32 LE, worker u16 LE, socket u16 LE.
        pub fn to_bytes(self) -> [u8; TRAILER_LEN] {
            let mut bytes = [0u8; TRAILER_LEN];
            bytes[0..4].copy_from_slice(&self.generation.to_le_bytes());
            bytes[4..6].copy_from_slice(&self.worker.to_le_bytes());
            bytes[6..8].copy_from_slice(&self.socket.to_le_bytes());
            bytes
        }

        /// Reads the wire form.
        pub fn from_bytes(bytes: [u8; TRAILER_LEN]) -> Trailer {
            Trailer {
                generation: u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
                worker: u16::from_le_bytes([bytes[4], bytes[5]]),
                socket: u16::from_le_bytes([bytes[6], bytes[7]]),
            }
        }
    }

    /// Splits a reply into the echoed request and the trailer; `None` if it
    /// is too short to have a trailer.
    pub fn split_reply(reply: &[u8]) -> Option<(&[u8], Trailer)> {
        let at = reply.len().checked_sub(TRAILER_LEN)?;
        let (request, trailer) = reply.split_at(at);
        Some((request, Trailer::from_bytes(trailer.try_into().ok()?)))
    }

    /// The sequence number in the first 8 bytes of a request (or of a reply,
    /// which starts with the request); `None` if shorter.
    pub fn sequence(datagram: &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(datagram.get(..8)?.try_into().ok()?))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn trailer_layout_is_little_endian() {
            let trailer = Trailer {
                generation: 0x0403_0201,
                worker: 0x0605,
                socket: 0x0807,
            };
            assert_eq!(trailer.to_bytes(), [1, 2, 3, 4, 5, 6, 7, 8]);
            assert_eq!(Trailer::from_bytes(trailer.to_bytes()), trailer);
        }

        #[test]
        fn replies_split_into_request_and_trailer() {
            let mut reply = 42u64.to_le_bytes().to_vec();
            reply.extend_from_slice(
                &Trailer {
                    generation: 3,
                    worker: 1,
                    socket: 2,
                }
                .to_bytes(),
            );
            let (request, trailer) = split_reply(&reply).unwrap();
            assert_eq!(sequence(request), Some(42));
            assert_eq!(sequence(&reply), Some(42));
            assert_eq!(
                trailer,
                Trailer {
                    generation: 3,
                    worker: 1,
                    socket: 2
                }
            );
            assert_eq!(split_reply(&[0; 7]), None);
            assert_eq!(split_reply(&[0; 8]).unwrap().0, b"");
        }
    }
}
