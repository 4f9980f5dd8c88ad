//! Replication between masters over gRPC: openraft's three messages, each carried whole in a
//! [`v1::RaftPayload`] in the registry's own encoding (postcard), on a listener each master
//! keeps for raft alone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agora_proto::{MAX_MESSAGE_BYTES, v1};
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use super::{NodeId, Raft, TypeConfig};

/// Makes a connection per peer, to its raft address.
pub struct Network {
    raft_addrs: Arc<BTreeMap<NodeId, String>>,
    /// This master's certificate and the cluster CA: peers are dialled over mutual TLS.
    tls: Option<agora_proto::tls::ServerTls>,
}

impl Network {
    /// `raft_addrs`: where members take raft when not at their address in the membership.
    pub fn new(
        raft_addrs: BTreeMap<NodeId, String>,
        tls: Option<agora_proto::tls::ServerTls>,
    ) -> Self {
        Network {
            raft_addrs: Arc::new(raft_addrs),
            tls,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: self
                .raft_addrs
                .get(&target)
                .cloned()
                .unwrap_or_else(|| node.addr.clone()),
            tls: self.tls.clone(),
            client: None,
        }
    }
}

/// One peer master.
pub struct Peer {
    target: NodeId,
    addr: String,
    /// Read at each dial: a reloaded certificate is presented from the next connection on.
    tls: Option<agora_proto::tls::ServerTls>,
    client: Option<v1::raft_peer_client::RaftPeerClient<Channel>>,
}

#[derive(Clone, Copy)]
enum Kind {
    Append,
    Vote,
    Snapshot,
}

impl Peer {
    fn client(&mut self) -> Result<v1::raft_peer_client::RaftPeerClient<Channel>, String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let channel = agora_proto::tls::endpoint(
            &format!("http://{}", self.addr),
            self.tls
                .as_ref()
                .map(agora_proto::tls::ServerTls::as_client)
                .as_ref(),
        )
        .map_err(|e| format!("peer address {}: {e}", self.addr))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy();
        let c = v1::raft_peer_client::RaftPeerClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        self.client = Some(c.clone());
        Ok(c)
    }

    async fn call<Req, Resp, E>(
        &mut self,
        kind: Kind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let unreachable =
            |e: String| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e)));
        let mut client = self.client().map_err(unreachable)?;
        let data = postcard::to_stdvec(req).map_err(|e| {
            RPCError::Network(NetworkError::new(&std::io::Error::other(e.to_string())))
        })?;
        let mut request = tonic::Request::new(v1::RaftPayload { data });
        request.set_timeout(option.hard_ttl());
        let response = match kind {
            Kind::Append => client.append_entries(request).await,
            Kind::Vote => client.vote(request).await,
            Kind::Snapshot => client.install_snapshot(request).await,
        };
        let payload = match response {
            Ok(r) => r.into_inner(),
            Err(status) => {
                // The connection is rebuilt next time: the peer may have restarted elsewhere.
                self.client = None;
                return Err(unreachable(format!(
                    "peer {} at {}: {}",
                    self.target,
                    self.addr,
                    status.message()
                )));
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> = postcard::from_bytes(&payload.data)
            .map_err(|e| {
                RPCError::Network(NetworkError::new(&std::io::Error::other(format!(
                    "peer {} sent an answer that does not decode: {e}",
                    self.target
                ))))
            })?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Kind::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Kind::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Kind::Vote, &rpc, &option).await
    }
}

/// The server side: hands peers' messages to the local raft node.
pub struct PeerService {
    pub raft: Raft,
    /// Noted at each message of the leader this node follows.
    pub heard: Arc<Heard>,
    /// Over TLS, only masters (by their certificates) may speak raft.
    pub tls: bool,
}

impl PeerService {
    fn authorise(&self, req: &tonic::Request<v1::RaftPayload>) -> Result<(), tonic::Status> {
        if !self.tls {
            return Ok(());
        }
        match agora_proto::tls::principal(req) {
            Some(p) if p.kind == agora_proto::tls::Kind::Master => Ok(()),
            Some(p) => Err(tonic::Status::permission_denied(format!(
                "raft is for masters; this certificate is of {p}"
            ))),
            None => Err(tonic::Status::unauthenticated(
                "raft needs a master's certificate from the cluster CA",
            )),
        }
    }
}

/// When this node last heard from the leader it follows. openraft keeps this to itself in
/// 0.9; the master needs it to tell a leader that just fell silent (it may be dead, an
/// election is coming) from one that leads.
#[derive(Debug)]
pub struct Heard {
    base: Instant,
    /// Milliseconds after `base` plus one; 0 for never.
    at: AtomicU64,
}

impl Default for Heard {
    fn default() -> Self {
        Heard {
            base: Instant::now(),
            at: AtomicU64::new(0),
        }
    }
}

impl Heard {
    pub fn note(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.at.store(ms + 1, Ordering::Relaxed);
    }

    /// How long ago the leader was last heard, if ever.
    pub fn since(&self) -> Option<Duration> {
        match self.at.load(Ordering::Relaxed) {
            0 => None,
            at => Some(
                self.base
                    .elapsed()
                    .saturating_sub(Duration::from_millis(at - 1)),
            ),
        }
    }
}

fn decode<T: DeserializeOwned>(req: tonic::Request<v1::RaftPayload>) -> Result<T, tonic::Status> {
    postcard::from_bytes(&req.into_inner().data)
        .map_err(|e| tonic::Status::invalid_argument(format!("raft message does not decode: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<tonic::Response<v1::RaftPayload>, tonic::Status> {
    postcard::to_stdvec(v)
        .map(|data| tonic::Response::new(v1::RaftPayload { data }))
        .map_err(|e| tonic::Status::internal(format!("encoding a raft answer: {e}")))
}

#[tonic::async_trait]
impl v1::raft_peer_server::RaftPeer for PeerService {
    async fn append_entries(
        &self,
        req: tonic::Request<v1::RaftPayload>,
    ) -> Result<tonic::Response<v1::RaftPayload>, tonic::Status> {
        self.authorise(&req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req)?;
        let answer = self.raft.append_entries(rpc).await;
        // Any answer but "my vote is higher" means the sender is the leader this node follows.
        if matches!(&answer, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
            self.heard.note();
        }
        encode(&answer)
    }

    async fn vote(
        &self,
        req: tonic::Request<v1::RaftPayload>,
    ) -> Result<tonic::Response<v1::RaftPayload>, tonic::Status> {
        self.authorise(&req)?;
        let rpc: VoteRequest<NodeId> = decode(req)?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: tonic::Request<v1::RaftPayload>,
    ) -> Result<tonic::Response<v1::RaftPayload>, tonic::Status> {
        self.authorise(&req)?;
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req)?;
        let answer = self.raft.install_snapshot(rpc).await;
        if answer.is_ok() {
            self.heard.note();
        }
        encode(&answer)
    }
}
