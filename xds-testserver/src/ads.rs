//! The tonic `AggregatedDiscoveryService`: checks the bearer token, then runs one task per delta
//! stream around the pure [`StreamState`]: requests and state changes in, responses out, events
//! logged and reported to the client registry.
//!
//! Not here: the delta rules themselves (`protocol`), TLS (the transport does it), the CA service
//! (`ca`, which shares the token check).

use std::net::SocketAddr;
use std::sync::Arc;

use l4mesh::proto::envoy::discovery::aggregated_discovery_service_server::AggregatedDiscoveryService;
use l4mesh::proto::envoy::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::protocol::{Event, StreamState};
use crate::server::{now_unix_ms, Shared};

/// Responses buffered per stream before the stream task waits for the client to read.
const RESPONSE_BUFFER: usize = 16;

/// The gRPC service.
pub(crate) struct Ads {
    shared: Arc<Shared>,
}

impl Ads {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type ResponseStream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "xds-testserver serves delta xDS only: use DeltaAggregatedResources",
        ))
    }

    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        if let Err(status) = check_token(self.shared.token.as_deref(), request.metadata()) {
            warn!(peer = ?peer, "refused an xDS stream: {}", status.message());
            return Err(status);
        }
        let id = self.shared.next_client_id();
        self.shared.registry().connected(id, peer, now_unix_ms());
        info!(client = id, peer = ?peer, "xDS stream opened");
        let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
        tokio::spawn(run_stream(
            self.shared.clone(),
            id,
            peer,
            request.into_inner(),
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// `Ok` when no token is required or the metadata carries `authorization: Bearer <token>` (for the
/// CA service too).
pub(crate) fn check_token(expected: Option<&str>, metadata: &MetadataMap) -> Result<(), Status> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let got = metadata.get("authorization").map(|v| v.to_str());
    match got {
        Some(Ok(value)) if value.strip_prefix("Bearer ").map(str::trim) == Some(expected) => Ok(()),
        None => Err(Status::unauthenticated(
            "missing `authorization` metadata: expected `authorization: Bearer <token>` \
             with the token of the server's --token-file",
        )),
        Some(_) => Err(Status::unauthenticated(
            "wrong `authorization` metadata: expected `authorization: Bearer <token>` \
             with the token of the server's --token-file",
        )),
    }
}

type Tx = mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>;

/// Runs one stream until the client closes it, goes away, or the server shuts down.
async fn run_stream(
    shared: Arc<Shared>,
    id: u64,
    peer: Option<SocketAddr>,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: Tx,
) {
    let mut state_rx = shared.subscribe_state();
    let stopped = shared.stopped();
    tokio::pin!(stopped);
    let mut stream = StreamState::new(format!("{}-{id}", shared.nonce_prefix));
    let reason = loop {
        let responses = tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    let state = state_rx.borrow_and_update().clone();
                    let out = stream.on_request(&req, &state, now_unix_ms());
                    report(&shared, id, peer, &stream, &req, out.events);
                    // The state just marked seen may be newer than what the other types were
                    // synced to: a change landing while a request of one type is handled must
                    // reach every type now, not at the next change.
                    let mut responses = out.responses;
                    responses.extend(stream.on_state(&state));
                    responses
                }
                Ok(None) => break "the client closed the stream".to_owned(),
                Err(status) => break format!("receive error: {status}"),
            },
            changed = state_rx.changed() => {
                if changed.is_err() {
                    break "the server state is gone".to_owned();
                }
                let state = state_rx.borrow_and_update().clone();
                stream.on_state(&state)
            }
            () = &mut stopped => {
                // Best effort: a client that does not read must not hold up the shutdown.
                let _ = tx.try_send(Err(Status::unavailable("xds-testserver is shutting down")));
                break "the server is shutting down".to_owned();
            }
            () = tx.closed() => break "the client went away".to_owned(),
        };
        if !send(&tx, id, responses).await {
            break "the client went away".to_owned();
        }
        shared
            .registry()
            .update(id, stream.node_id(), stream.info());
    };
    shared.registry().disconnected(id, now_unix_ms());
    info!(
        client = id,
        node = stream.node_id().unwrap_or(""),
        "xDS stream ended: {reason}"
    );
}

/// Sends responses in order; false when the client is gone.
async fn send(tx: &Tx, id: u64, responses: Vec<DeltaDiscoveryResponse>) -> bool {
    for r in responses {
        debug!(
            client = id,
            type_url = %r.type_url,
            nonce = %r.nonce,
            resources = r.resources.len(),
            removed = r.removed_resources.len(),
            "sending delta response"
        );
        if tx.send(Ok(r)).await.is_err() {
            return false;
        }
    }
    true
}

/// Logs a request's events and records NACKs.
fn report(
    shared: &Shared,
    id: u64,
    peer: Option<SocketAddr>,
    stream: &StreamState,
    req: &DeltaDiscoveryRequest,
    events: Vec<Event>,
) {
    let node = stream.node_id().unwrap_or("");
    debug!(
        client = id,
        node,
        type_url = %req.type_url,
        subscribe = ?req.resource_names_subscribe,
        unsubscribe = ?req.resource_names_unsubscribe,
        initial = req.initial_resource_versions.len(),
        nonce = %req.response_nonce,
        "delta request"
    );
    let mut registry = shared.registry();
    registry.update(id, stream.node_id(), stream.info());
    for event in events {
        match event {
            Event::Ack { kind, nonce } => debug!(client = id, node, %kind, %nonce, "ACK"),
            Event::Nack { kind, nack } => {
                warn!(
                    client = id,
                    node,
                    peer = ?peer,
                    %kind,
                    nonce = %nack.nonce,
                    resources = ?nack.resources,
                    "NACK: {}",
                    nack.message
                );
                registry.nack(id, kind, nack);
            }
            Event::UnknownNonce { kind, nonce } => {
                debug!(client = id, node, %kind, %nonce, "ACK of an unknown or forgotten nonce")
            }
            Event::UnknownType { type_url } => warn!(
                client = id,
                node,
                %type_url,
                "request for a type this server does not serve (only Address and Authorization); ignored"
            ),
        }
    }
}
