//! One HTTP/2 request stream as the engine serves it, on the h2 crate directly: the request as
//! accepted (refused first if it is malformed in ways the h2 crate lets through:
//! `tether_http::checks::h2_malformed`), its body read with flow control, its response sent as
//! the client's window allows, within `send_timeout`.
//!
//! Why not Pingora's HTTP/2 session: it converts every request and response head into its own
//! header types and back (a header-map clone per response), and adds a `Date`; about 6 % of the
//! CPU per request in a profile of the POST mix over HTTP/2.

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use std::future::poll_fn;
use std::task::{Context, Poll};
use std::time::Duration;
use tether_http::checks::{self, H2Malformed};
use tokio::time::timeout;

/// The client has gone, reset its stream, or stopped reading for `send_timeout`.
#[derive(Debug)]
pub(super) struct Gone;

/// One request stream.
pub(super) struct Session {
    /// The request head.
    pub(super) request: Parts,
    body: RecvStream,
    respond: SendResponse<Bytes>,
    send: Option<SendStream<Bytes>>,
    /// The status of the response head sent, if one was.
    status: Option<u16>,
    /// The end of the stream was sent.
    ended: bool,
    body_sent: usize,
    send_timeout: Duration,
}

impl Session {
    /// A new stream: a session to serve, or None when it was malformed and has been refused
    /// (reset, or answered 400).
    pub(super) fn accept(
        request: http::Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) -> Option<Session> {
        let (request, body) = request.into_parts();
        let path = request
            .uri
            .path_and_query()
            .map_or(&b""[..], |p| p.as_str().as_bytes());
        let refused = checks::h2_malformed(
            request.method == Method::CONNECT,
            path,
            request.uri.authority().map(|a| a.as_str().as_bytes()),
            request
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_bytes())),
        );
        match refused {
            Some(H2Malformed::Reset) => {
                respond.send_reset(Reason::PROTOCOL_ERROR);
                None
            }
            Some(H2Malformed::BadRequest) => {
                let mut response = Response::new(());
                *response.status_mut() = StatusCode::BAD_REQUEST;
                // A client that reset meanwhile needs no answer.
                let _ = respond.send_response(response, true);
                None
            }
            None => Some(Session {
                request,
                body,
                respond,
                send: None,
                status: None,
                ended: false,
                body_sent: 0,
                send_timeout: Duration::MAX,
            }),
        }
    }

    /// The request target (`:path`).
    pub(super) fn target(&self) -> &str {
        self.request.uri.path_and_query().map_or("", |p| p.as_str())
    }

    /// The request has no body (its HEADERS ended the stream).
    pub(super) fn is_body_empty(&self) -> bool {
        self.body.is_end_stream()
    }

    /// How long a client may leave the response unread before it is given up.
    pub(super) fn set_send_timeout(&mut self, send_timeout: Duration) {
        self.send_timeout = send_timeout;
    }

    /// The request body's next DATA frame, None at its end; its bytes are handed back to the
    /// client's window as they are read.
    pub(super) async fn read_body(&mut self) -> Result<Option<Bytes>, Gone> {
        match self.body.data().await {
            None => Ok(None),
            Some(Err(_)) => Err(Gone),
            Some(Ok(data)) => {
                let _ = self.body.flow_control().release_capacity(data.len());
                Ok(Some(data))
            }
        }
    }

    /// Ready once the client has reset the stream or the connection has gone.
    pub(super) fn poll_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.send.as_mut() {
            Some(send) => send.poll_reset(cx).map(|_| ()),
            None => self.respond.poll_reset(cx).map(|_| ()),
        }
    }

    /// Sends the response head; `end`: it is the whole response.
    pub(super) fn send_head(&mut self, response: Response<()>, end: bool) -> Result<(), Gone> {
        if self.status.is_some() {
            return Err(Gone);
        }
        let status = response.status().as_u16();
        let send = self
            .respond
            .send_response(response, end)
            .map_err(|_| Gone)?;
        self.status = Some(status);
        self.send = Some(send);
        self.ended = end;
        Ok(())
    }

    /// Sends body bytes as the client's window allows; `end`: the last of them.
    pub(super) async fn send_data(&mut self, mut data: Bytes, end: bool) -> Result<(), Gone> {
        if self.ended {
            return Ok(());
        }
        let Some(send) = self.send.as_mut() else {
            return Err(Gone);
        };
        let len = data.len();
        let sending = async {
            if data.is_empty() {
                return send.send_data(data, end).map_err(|_| Gone);
            }
            while !data.is_empty() {
                send.reserve_capacity(data.len());
                let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(granted)) => granted,
                    _ => return Err(Gone),
                };
                let chunk = data.split_to(granted.min(data.len()));
                send.send_data(chunk, end && data.is_empty())
                    .map_err(|_| Gone)?;
            }
            Ok(())
        };
        if !matches!(timeout(self.send_timeout, sending).await, Ok(Ok(()))) {
            return Err(Gone);
        }
        self.body_sent += len;
        self.ended = end;
        Ok(())
    }

    /// Ends the stream after what was sent (nothing, if the head ended it).
    pub(super) fn finish(&mut self) -> Result<(), Gone> {
        if self.ended {
            return Ok(());
        }
        let send = self.send.as_mut().ok_or(Gone)?;
        send.send_data(Bytes::new(), true).map_err(|_| Gone)?;
        self.ended = true;
        Ok(())
    }

    /// The status sent, if a response head was.
    pub(super) fn status(&self) -> Option<u16> {
        self.status
    }

    /// Body bytes sent.
    pub(super) fn body_sent(&self) -> usize {
        self.body_sent
    }
}
