//! The Replication service as the daemon serves it: tonic's generated
//! server for every RPC but `Replicate`, whose stream of epoch chunks is
//! read here straight from the HTTP/2 DATA frames (no copy of the pages
//! into tonic's receive buffer; `understudy_proto::framing` says why). The
//! bytes on the wire, the checks (mutual TLS, the caller's role) and the
//! session behind it are the same as tonic's path
//! ([`ReplicationService::open_replicate`]).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body as _, Frame};
use tokio_stream::Stream;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use understudy_proto::framing::{self, MessageReader};
use understudy_proto::replication_server::ReplicationServer;
use understudy_proto::{Ack, EpochChunk};

use crate::service::ReplicationService;

/// tonic's Replication server with `Replicate` taken over.
#[derive(Clone)]
pub(crate) struct Router {
    service: ReplicationService,
    grpc: ReplicationServer<ReplicationService>,
}

impl Router {
    pub(crate) fn new(service: ReplicationService) -> Self {
        Self {
            grpc: ReplicationServer::new(service.clone()),
            service,
        }
    }
}

impl NamedService for Router {
    const NAME: &'static str = <ReplicationServer<ReplicationService> as NamedService>::NAME;
}

impl tonic::codegen::Service<http::Request<Body>> for Router {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != framing::REPLICATE_PATH {
            return Box::pin(self.grpc.call(req));
        }
        let response = replicate(&self.service, req);
        Box::pin(async move { Ok(response) })
    }
}

/// Answers one Replicate call: the acks stream back as its response body,
/// or a refusal (not the pair's other host, an injected fault) ends it at
/// once with its status, as tonic would.
fn replicate(service: &ReplicationService, req: http::Request<Body>) -> http::Response<Body> {
    let (parts, body) = req.into_parts();
    let caller = tonic::Request::from_http(http::Request::from_parts(parts, ()));
    let incoming = Chunks {
        body,
        reader: MessageReader::new(framing::MAX_MESSAGE),
        done: false,
    };
    match service.open_replicate(&caller, incoming) {
        Ok(acks) => {
            let mut response = http::Response::new(Body::new(AckBody { acks, done: false }));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            response
        }
        Err(status) => status.into_http(),
    }
}

/// The request body as a stream of messages.
struct Chunks {
    body: Body,
    reader: MessageReader,
    done: bool,
}

impl Stream for Chunks {
    type Item = Result<EpochChunk, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.reader.next_message() {
                Ok(Some(message)) => {
                    return Poll::Ready(Some(framing::decode_epoch_chunk(message)));
                }
                Ok(None) => {}
                Err(status) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers (a client's) carry nothing for this stream.
                    if let Ok(data) = frame.into_data() {
                        this.reader.push(data);
                    }
                }
                Some(Err(status)) => {
                    this.done = true;
                    // The peer went away: the stream's end, as tonic says it.
                    if status.code() == tonic::Code::Cancelled {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(status)));
                }
                None => {
                    this.done = true;
                    let left = this.reader.buffered();
                    if left > 0 {
                        return Poll::Ready(Some(Err(Status::internal(format!(
                            "the replication stream ended inside a message ({left} bytes of it \
                             came)"
                        )))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

/// The acks as a gRPC response body: each one framed, then the trailers
/// with the stream's status.
struct AckBody {
    acks: tokio::sync::mpsc::Receiver<Result<Ack, Status>>,
    done: bool,
}

impl http_body::Body for AckBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let frame = match ready!(this.acks.poll_recv(cx)) {
            Some(Ok(ack)) => Frame::data(framing::encode_message(&ack)),
            Some(Err(status)) => {
                this.done = true;
                Frame::trailers(framing::status_trailers(&status))
            }
            None => {
                this.done = true;
                Frame::trailers(framing::ok_trailers())
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}
