//! The bodies HTTP mode passes on, streamed frame by frame, never held whole.

use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};

use super::pool::Lease;
use crate::transfer_table::InFlight;

/// A request body on its way to a back end: the client's stream, or none
/// (what a retried body-less request is rebuilt with).
pub enum ReqBody {
    Stream(Incoming),
    Empty,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Stream(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Stream(b) => b.is_end_stream(),
            ReqBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Stream(b) => b.size_hint(),
            ReqBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A response body on its way to the client: a back end's stream, whose
/// server connection goes back to its pool the moment the stream ends, or
/// fep's own short text.
pub enum RespBody {
    Backend {
        body: Incoming,
        lease: Option<Lease>,
        in_flight: Option<InFlight>,
    },
    Text(Option<Bytes>),
}

impl RespBody {
    pub fn backend(body: Incoming, lease: Lease, in_flight: InFlight) -> Self {
        let mut body = RespBody::Backend {
            body,
            lease: Some(lease),
            in_flight: Some(in_flight),
        };
        body.finish_if_ended();
        body
    }

    /// Ends the request's hold on its back end once the response is whole.
    fn finish_if_ended(&mut self) {
        if let RespBody::Backend {
            body,
            lease,
            in_flight,
        } = self
        {
            if body.is_end_stream() {
                if let Some(lease) = lease.take() {
                    lease.release();
                }
                in_flight.take();
            }
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match this {
            RespBody::Backend { body, .. } => Pin::new(body).poll_frame(cx),
            RespBody::Text(text) => return Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
        };
        match &polled {
            Poll::Ready(None) => this.finish_if_ended(),
            // A broken response: its connection is not reused.
            Poll::Ready(Some(Err(_))) => {
                if let RespBody::Backend {
                    lease, in_flight, ..
                } = this
                {
                    lease.take();
                    in_flight.take();
                }
            }
            Poll::Ready(Some(Ok(_))) => this.finish_if_ended(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Backend { body, .. } => body.is_end_stream(),
            RespBody::Text(t) => t.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Backend { body, .. } => body.size_hint(),
            RespBody::Text(t) => SizeHint::with_exact(t.as_ref().map_or(0, |t| t.len() as u64)),
        }
    }
}
