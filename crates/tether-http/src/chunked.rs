//! [`ChunkedEnd`]: the one chunked decoder. It finds where a chunked body ends in bytes passed
//! through unchanged (request bodies to a backend, responses to an HTTP/1 client), so a message
//! can be relayed as it arrives and its connection still kept alive after it, and it counts the
//! body's data bytes (for `max_body`); [`ChunkedEnd::decode`] also hands out the data itself,
//! for a response going to an HTTP/2 client, which has framing of its own. Anything that is not exactly RFC 9112 7.1 chunked
//! framing is an error: the connection cannot be trusted any more.

/// Longest chunk-size line (with extensions) or trailer section accepted.
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In the hex digits of a chunk size.
    Size { value: u64, digits: u8 },
    /// After the size: extensions up to the line's end.
    Extension { value: u64, seen: usize },
    /// Expecting the LF of a size line.
    SizeLf { value: u64 },
    /// Inside a chunk's data.
    Data { left: u64 },
    /// Expecting the CR after a chunk's data.
    DataCr,
    /// Expecting the LF after a chunk's data.
    DataLf,
    /// In the trailer section; `blank` while the current line is still empty (bar a CR),
    /// `cr` right after a CR.
    Trailers { blank: bool, cr: bool, seen: usize },
    /// The body has ended.
    Done,
}

/// Tracks the framing of one chunked body across the reads it arrives in.
#[derive(Debug, Clone)]
pub struct ChunkedEnd {
    state: State,
    /// Data bytes seen so far (chunk payloads, not framing).
    data: u64,
}

/// The body's framing is broken; the connection cannot be trusted any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadChunk;

impl Default for ChunkedEnd {
    fn default() -> ChunkedEnd {
        ChunkedEnd {
            state: State::Size {
                value: 0,
                digits: 0,
            },
            data: 0,
        }
    }
}

impl ChunkedEnd {
    /// The body's data bytes seen so far.
    pub fn data_bytes(&self) -> u64 {
        self.data
    }

    /// Reads `bytes`, the next part of the body: `Some(n)` when the body ends after the first
    /// `n` of them (anything after belongs to the next message), `None` when it goes on.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, BadChunk> {
        self.run(bytes, None)
    }

    /// As [`feed`](Self::feed), and appends the chunks' data among `bytes` to `data`.
    pub fn decode(&mut self, bytes: &[u8], data: &mut Vec<u8>) -> Result<Option<usize>, BadChunk> {
        self.run(bytes, Some(data))
    }

    fn run(
        &mut self,
        bytes: &[u8],
        mut data: Option<&mut Vec<u8>>,
    ) -> Result<Option<usize>, BadChunk> {
        if self.state == State::Done {
            return Ok(Some(0));
        }
        let mut i = 0;
        while i < bytes.len() {
            if let State::Data { left } = self.state {
                let take = left.min((bytes.len() - i) as u64);
                if let Some(data) = data.as_deref_mut() {
                    data.extend_from_slice(&bytes[i..i + take as usize]);
                }
                i += take as usize;
                self.data += take;
                self.state = if take == left {
                    State::DataCr
                } else {
                    State::Data { left: left - take }
                };
                continue;
            }
            let b = bytes[i];
            i += 1;
            self.state = match self.state {
                State::Size { value, digits } => match hex(b) {
                    Some(d) if digits < 16 => State::Size {
                        value: value * 16 + u64::from(d),
                        digits: digits + 1,
                    },
                    Some(_) => return Err(BadChunk),
                    None if digits == 0 => return Err(BadChunk),
                    None => match b {
                        b';' | b' ' | b'\t' => State::Extension { value, seen: 0 },
                        b'\r' => State::SizeLf { value },
                        // A bare LF is read differently by different servers: refused.
                        _ => return Err(BadChunk),
                    },
                },
                State::Extension { value, seen } => match b {
                    b'\r' => State::SizeLf { value },
                    b'\n' => return Err(BadChunk),
                    _ if seen >= MAX_LINE => return Err(BadChunk),
                    _ => State::Extension {
                        value,
                        seen: seen + 1,
                    },
                },
                State::SizeLf { value } if b == b'\n' => end_of_size(value),
                State::SizeLf { .. } => return Err(BadChunk),
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err(BadChunk),
                },
                State::DataLf if b == b'\n' => State::Size {
                    value: 0,
                    digits: 0,
                },
                State::DataLf => return Err(BadChunk),
                State::Trailers { blank, cr, seen } => {
                    if b == b'\n' {
                        if !cr {
                            return Err(BadChunk);
                        }
                        if blank {
                            self.state = State::Done;
                            return Ok(Some(i));
                        }
                        State::Trailers {
                            blank: true,
                            cr: false,
                            seen: seen + 1,
                        }
                    } else if seen >= MAX_TRAILERS || cr {
                        return Err(BadChunk);
                    } else {
                        State::Trailers {
                            blank: blank && b == b'\r',
                            cr: b == b'\r',
                            seen: seen + 1,
                        }
                    }
                }
                // Both are dealt with before a byte is looked at.
                State::Data { .. } | State::Done => return Err(BadChunk),
            };
        }
        Ok(None)
    }
}

fn end_of_size(value: u64) -> State {
    if value == 0 {
        State::Trailers {
            blank: true,
            cr: false,
            seen: 0,
        }
    } else {
        State::Data { left: value }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn end_of(body: &[u8]) -> Result<Option<usize>, BadChunk> {
        ChunkedEnd::default().feed(body)
    }

    #[test]
    fn finds_the_end_of_whole_bodies() {
        assert_eq!(end_of(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(end_of(b"5\r\nhello\r\n0\r\n\r\nNEXT"), Ok(Some(15)));
        assert_eq!(
            end_of(b"5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"),
            Ok(Some(29))
        );
        assert_eq!(end_of(b"A\r\n0123456789\r\n0\r\n\r\n"), Ok(Some(20)));
    }

    #[test]
    fn data_bytes_count_payloads_only() {
        let mut body = ChunkedEnd::default();
        assert_eq!(body.feed(b"5;x=1\r\nhel"), Ok(None));
        assert_eq!(body.data_bytes(), 3);
        assert_eq!(
            body.feed(b"lo\r\nA\r\n0123456789\r\n0\r\n\r\n"),
            Ok(Some(24))
        );
        assert_eq!(body.data_bytes(), 15);
    }

    #[test]
    fn an_unfinished_body_goes_on() {
        assert_eq!(end_of(b"5\r\nhel"), Ok(None));
        assert_eq!(end_of(b"5\r\nhello\r\n0\r\n"), Ok(None));
        assert_eq!(end_of(b"5\r\nhello\r\n0\r\nX-T: 1\r\n"), Ok(None));
    }

    #[test]
    fn broken_framing_is_an_error() {
        assert_eq!(end_of(b"x\r\n"), Err(BadChunk));
        assert_eq!(end_of(b"\r\n"), Err(BadChunk));
        assert_eq!(end_of(b"5\r\nhelloXX"), Err(BadChunk));
        assert_eq!(end_of(b"11111111111111111\r\n"), Err(BadChunk));
        assert_eq!(end_of(b"5\rX"), Err(BadChunk));
        assert_eq!(end_of(b"5\nhello\r\n0\r\n\r\n"), Err(BadChunk));
        assert_eq!(end_of(b"5\r\nhello\n0\r\n\r\n"), Err(BadChunk));
        assert_eq!(end_of(b"0\r\nX: 1\n\r\n"), Err(BadChunk));
    }

    proptest! {
        /// However a body is cut into reads, its end is found at the same byte.
        #[test]
        fn the_end_does_not_depend_on_how_reads_split_the_body(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 0..6),
            trailer in prop::bool::ANY,
            cuts in prop::collection::vec(1usize..30, 1..20),
        ) {
            let mut body = Vec::new();
            for chunk in &chunks {
                body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                body.extend_from_slice(chunk);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n");
            if trailer {
                body.extend_from_slice(b"X-Sum: 1\r\n");
            }
            body.extend_from_slice(b"\r\n");
            let total = body.len();
            body.extend_from_slice(b"GET / HTTP/1.1\r\n");

            let mut scanner = ChunkedEnd::default();
            let mut decoder = ChunkedEnd::default();
            let mut data = Vec::new();
            let mut at = 0;
            let mut found = None;
            for cut in cuts.iter().cycle() {
                if at >= body.len() {
                    break;
                }
                let end = (at + cut).min(body.len());
                let decoded = decoder.decode(&body[at..end], &mut data).unwrap();
                let fed = scanner.feed(&body[at..end]).unwrap();
                prop_assert_eq!(decoded, fed);
                if let Some(n) = fed {
                    found = Some(at + n);
                    break;
                }
                at = end;
            }
            prop_assert_eq!(found, Some(total));
            // Decoding hands out exactly the chunks' data, in order.
            prop_assert_eq!(data, chunks.concat());
        }
    }
}
