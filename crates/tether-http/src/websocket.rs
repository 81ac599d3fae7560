//! The WebSocket pieces the proxy needs without speaking the protocol: the handshake's key and
//! accept (RFC 6455 4), the close frame Tether sends when it ends a stream, and a cursor that
//! follows frame boundaries so that close frame never lands inside a backend's frame.

use bytes::Bytes;

/// The `Sec-WebSocket-Accept` a server must answer to `key` (RFC 6455 4.2.2).
pub fn accept(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::Digest;
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha = sha1::Sha1::new();
    sha.update(key);
    sha.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A `Sec-WebSocket-Key` must be the base64 of 16 bytes (RFC 6455 4.1).
pub fn valid_key(key: &[u8]) -> bool {
    use base64::Engine;
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

/// Whether a backend's `101` completes the WebSocket handshake the client asked for: a 101
/// to anything but a WebSocket upgrade, or with a wrong `Sec-WebSocket-Accept`, would open a
/// tunnel the client never agreed to, so it becomes a 502.
pub fn valid_switch(request_key: Option<&[u8]>, answer: Option<&[u8]>) -> bool {
    match (request_key, answer) {
        (Some(key), Some(answer)) => accept(key).as_bytes() == answer,
        _ => false,
    }
}

/// A server-to-client WebSocket close frame (RFC 6455 5.5.1: unmasked, code then reason).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut frame = Vec::with_capacity(4 + reason.len());
    frame.push(0x88); // FIN + opcode 8 (close)
    frame.push(2 + reason.len() as u8);
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    Bytes::from(frame)
}

/// Follows the frames of a WebSocket byte stream (RFC 6455 5.2) so that a close frame Tether
/// adds lands between two frames, never inside one. It only reads frame headers: payloads are
/// skipped by length, whatever their content or extensions.
#[derive(Debug, Default, Clone)]
pub struct FrameCursor {
    /// The header bytes of the frame being read, while its header is incomplete.
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
}

impl FrameCursor {
    /// True when the bytes seen so far end exactly at the end of a frame.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }

    /// Takes in the next `bytes` of the stream.
    pub fn advance(&mut self, bytes: &[u8]) {
        let mut used = 0;
        while used < bytes.len() {
            used += self.step(&bytes[used..]);
        }
    }

    /// Takes in `bytes` up to the end of the current frame (all of them if it does not end
    /// within them); returns how many it took. Takes none at a boundary.
    pub fn finish_frame(&mut self, bytes: &[u8]) -> usize {
        let mut used = 0;
        while used < bytes.len() && !self.at_boundary() {
            used += self.step(&bytes[used..]);
        }
        used
    }

    /// The header's full length once its first two bytes are known.
    fn header_len(&self) -> Option<usize> {
        if self.have < 2 {
            return None;
        }
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        Some(2 + extended + mask)
    }

    /// Consumes a non-empty prefix of `bytes` (payload, or header bytes); returns its length.
    fn step(&mut self, bytes: &[u8]) -> usize {
        if self.payload_left > 0 {
            let n = usize::try_from(self.payload_left)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            self.payload_left -= n as u64;
            return n;
        }
        let wanted = self.header_len().unwrap_or(2);
        let n = (wanted - self.have).min(bytes.len());
        self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
        self.have += n;
        if self.header_len() == Some(self.have) {
            let h = &self.header;
            self.payload_left = match h[1] & 0x7f {
                126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
                127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
                len => u64::from(len),
            };
            self.have = 0;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload_len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x82];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload_len {
            0..=125 => f.push(mask_bit | payload_len as u8),
            126..=65535 => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.resize(f.len() + payload_len, b'x');
        f
    }

    #[test]
    fn the_cursor_finds_every_frame_end_however_the_bytes_are_split() {
        let frames = [
            frame(0, false),
            frame(5, true),
            frame(300, false),
            frame(70_000, true),
        ];
        let stream: Vec<u8> = frames.concat();
        let mut ends = Vec::new();
        let mut at = 0;
        for f in &frames {
            at += f.len();
            ends.push(at);
        }
        for chunk in [1usize, 2, 3, 7, 64, 4096, stream.len()] {
            // Fed in pieces of `chunk` bytes, the cursor is at a boundary after a piece
            // exactly when that piece ends a frame.
            let mut cursor = FrameCursor::default();
            let mut seen = 0;
            for piece in stream.chunks(chunk) {
                cursor.advance(piece);
                seen += piece.len();
                assert_eq!(
                    cursor.at_boundary(),
                    ends.contains(&seen),
                    "chunks of {chunk}, after {seen} bytes"
                );
            }
        }
        let mut cursor = FrameCursor::default();
        cursor.advance(&stream[..ends[2] + 3]);
        assert!(
            !cursor.at_boundary(),
            "three bytes into the 70,000-byte frame's header"
        );
    }

    #[test]
    fn finish_frame_stops_at_the_end_of_the_current_frame() {
        let mut cursor = FrameCursor::default();
        let first = frame(10, false);
        cursor.advance(&first[..6]);
        let rest = [&first[6..], &frame(3, false)[..]].concat();
        assert_eq!(cursor.finish_frame(&rest), first.len() - 6);
        assert!(cursor.at_boundary());
        assert_eq!(
            cursor.finish_frame(&rest),
            0,
            "nothing to finish at a boundary"
        );
        // Mid-header too.
        let mut cursor = FrameCursor::default();
        let big = frame(200, true);
        cursor.advance(&big[..3]);
        assert_eq!(cursor.finish_frame(&big[3..]), big.len() - 3);
        assert!(cursor.at_boundary());
    }

    #[test]
    fn the_rfc_6455_example_key_gives_its_accept() {
        assert_eq!(
            accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert!(valid_switch(
            Some(b"dGhlIHNhbXBsZSBub25jZQ=="),
            Some(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        ));
        assert!(!valid_switch(
            Some(b"dGhlIHNhbXBsZSBub25jZQ=="),
            Some(b"d3Jvbmc=")
        ));
        assert!(!valid_switch(None, Some(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")));
        assert!(!valid_switch(Some(b"dGhlIHNhbXBsZSBub25jZQ=="), None));
    }

    #[test]
    fn a_key_must_be_sixteen_bytes_of_base64() {
        assert!(valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!valid_key(b"short"));
        assert!(!valid_key(b"dGhlIHNhbXBsZSBub25jZQ=!"));
        assert!(!valid_key(b""));
    }
}
