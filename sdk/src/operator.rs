//! Clients for operators and tools: the master's Operator API and the agents' Sandbox API.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agora_core::{FrameworkId, Resources, TaskId};
use agora_proto::dial::{self, Failure};
use agora_proto::resources_to_proto;
use agora_proto::v1::{self, operator_client::OperatorClient, sandbox_client::SandboxClient};
use tonic::transport::Channel;

use crate::Error;
use crate::masters::{self, DialPolicy};

/// A connection to an agent, over TLS with the environment's credentials, or a dev
/// cluster's ([`masters::Auth::for_masters`]).
async fn channel(addr: &str) -> Result<Channel, Error> {
    let tls = masters::Auth::for_masters(&[addr.to_owned()])?.tls;
    agora_proto::tls::endpoint(addr, tls.as_ref())
        .map_err(|e| Error::Invalid(format!("address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| Error::Connection(format!("connecting to {addr}: {e}")))
}

/// A client of the master's Operator API. Given a list of masters, it talks to the leader,
/// and finds the leader again when the one it talks to stops leading or goes away.
#[derive(Debug, Clone)]
pub struct Operator {
    masters: Vec<String>,
    policy: DialPolicy,
    auth: Arc<masters::Auth>,
    /// The master calls go to first, and its client.
    current: Arc<Mutex<(String, OperatorClient<masters::Chan>)>>,
}

impl Operator {
    /// Finds the leader among `master` (one address, or a comma-separated list) with a
    /// health call.
    ///
    /// # Errors
    /// [`Error::Connection`] when no master leads (naming each master tried and why),
    /// [`Error::Invalid`] for a bad list.
    pub async fn connect(master: &str) -> Result<Self, Error> {
        Self::connect_with(master, DialPolicy::default()).await
    }

    /// [`Operator::connect`] with the bounds of each search for the leader.
    ///
    /// # Errors
    /// As [`Operator::connect`].
    pub async fn connect_with(master: &str, policy: DialPolicy) -> Result<Self, Error> {
        let auth = masters::Auth::for_masters(&masters::parse(master)?)?;
        Self::connect_as(master, policy, auth).await
    }

    /// [`Operator::connect_with`], authenticating as `auth` says (its default: in the
    /// clear, as no one).
    ///
    /// # Errors
    /// As [`Operator::connect`].
    pub async fn connect_as(
        master: &str,
        policy: DialPolicy,
        auth: masters::Auth,
    ) -> Result<Self, Error> {
        let list = masters::parse(master)?;
        let auth = Arc::new(auth);
        let (url, (client, _)) = search(&list, &policy, &auth, |mut c| async move {
            c.get_health(v1::GetHealthRequest {}).await
        })
        .await?;
        Ok(Operator {
            masters: list,
            policy,
            auth,
            current: Arc::new(Mutex::new((url, client))),
        })
    }

    /// The master calls go to: the leader, when this client last looked.
    pub fn master(&self) -> String {
        self.current().0
    }

    fn current(&self) -> (String, OperatorClient<masters::Chan>) {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes `call` at the current master; when that one no longer leads or cannot be
    /// reached, searches for the leader (named one first) and makes it there.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, Error>
    where
        F: Fn(OperatorClient<masters::Chan>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let (at, client) = self.current();
        let named = match Failure::from(match call(client).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(status) => status,
        }) {
            Failure::Refused(status) => return Err(status.into()),
            Failure::NotLeader(named) => named,
            Failure::Unreachable(why) => {
                tracing::debug!(master = %at, %why, "searching for the leader");
                None
            }
        };
        let order = dial::order(&self.masters, named.as_deref(), Some(&at));
        let (url, (client, answer)) = search(&order, &self.policy, &self.auth, call).await?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = (url, client);
        Ok(answer.into_inner())
    }

    /// Agents, frameworks and tasks, as of the master's latest snapshot.
    ///
    /// # Errors
    /// When the call fails.
    pub async fn state(&self) -> Result<v1::GetStateResponse, Error> {
        self.call(|mut c| async move { c.get_state(v1::GetStateRequest {}).await })
            .await
    }

    /// # Errors
    /// When the call fails.
    pub async fn health(&self) -> Result<v1::GetHealthResponse, Error> {
        self.call(|mut c| async move { c.get_health(v1::GetHealthRequest {}).await })
            .await
    }

    /// Roles with their weights, quotas, allocations and reservations.
    ///
    /// # Errors
    /// When the call fails.
    pub async fn roles(&self) -> Result<Vec<v1::RoleState>, Error> {
        Ok(self
            .call(|mut c| async move { c.get_roles(v1::GetRolesRequest {}).await })
            .await?
            .roles)
    }

    /// Sets a role's weight.
    ///
    /// # Errors
    /// [`Error::Refused`] when the role or weight is invalid.
    pub async fn set_weight(&self, role: &str, weight: f64) -> Result<(), Error> {
        let req = v1::UpdateWeightRequest {
            role: role.to_owned(),
            weight,
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.update_weight(req).await }
        })
        .await?;
        Ok(())
    }

    /// Sets a role's quota; an empty guarantee and no limit remove it. With `force`, a
    /// guarantee larger than the cluster is accepted.
    ///
    /// # Errors
    /// [`Error::Refused`] when the quota is invalid, or exceeds the cluster without `force`.
    pub async fn set_quota(
        &self,
        role: &str,
        guarantee: &Resources,
        limit: Option<&Resources>,
        force: bool,
    ) -> Result<(), Error> {
        let req = v1::UpdateQuotaRequest {
            role: role.to_owned(),
            guarantee: resources_to_proto(guarantee),
            limit: limit.map(resources_to_proto).unwrap_or_default(),
            force,
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.update_quota(req).await }
        })
        .await?;
        Ok(())
    }
}

/// Searches `order` for the leader, making `call` at each master tried; returns the leader,
/// its client and its answer.
async fn search<T, F, Fut>(
    order: &[String],
    policy: &DialPolicy,
    auth: &masters::Auth,
    call: F,
) -> Result<(String, (OperatorClient<masters::Chan>, tonic::Response<T>)), Error>
where
    F: Fn(OperatorClient<masters::Chan>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let call = &call;
    Ok(dial::find_leader(order, policy, |url| async move {
        let client = OperatorClient::new(masters::channel(&url, false, auth).await?);
        let answer = call(client.clone())
            .await
            .map_err(masters::status_failure)?;
        Ok((client, answer))
    })
    .await?)
}

/// Reads the whole of `path` (e.g. `stdout`) from the sandbox of a task on the agent serving
/// at `agent_endpoint`.
///
/// # Errors
/// [`Error::Refused`] when the task or file is not there, [`Error::Connection`] when the
/// agent cannot be reached.
pub async fn read_sandbox_file(
    agent_endpoint: &str,
    framework: &FrameworkId,
    task: &TaskId,
    path: &str,
) -> Result<Vec<u8>, Error> {
    let mut client =
        SandboxClient::new(channel(agent_endpoint).await?).max_decoding_message_size(4 << 20);
    let mut out = Vec::new();
    loop {
        let r = client
            .read_file(v1::ReadFileRequest {
                framework_id: Some(framework.into()),
                task_id: Some(task.into()),
                path: path.to_owned(),
                offset: out.len() as u64,
                length: 1 << 20,
            })
            .await?
            .into_inner();
        let empty = r.data.is_empty();
        out.extend_from_slice(&r.data);
        if r.eof || empty {
            return Ok(out);
        }
    }
}

/// The running tasks of the agent at `agent_endpoint` and their usage now (from the agent's
/// Sandbox API; the master's state names each agent's endpoint).
///
/// # Errors
/// When the agent cannot be reached.
pub async fn agent_containers(agent_endpoint: &str) -> Result<Vec<v1::ContainerStatus>, Error> {
    let mut client = SandboxClient::new(channel(agent_endpoint).await?);
    Ok(client
        .get_containers(v1::GetContainersRequest {})
        .await?
        .into_inner()
        .containers)
}

/// An agent's metrics now (fetcher cache counters, executors), by name.
///
/// # Errors
/// When the agent cannot be reached or refuses.
pub async fn agent_metrics(
    agent_endpoint: &str,
) -> Result<std::collections::HashMap<String, f64>, Error> {
    let mut client = SandboxClient::new(channel(agent_endpoint).await?);
    Ok(client
        .get_metrics(v1::GetMetricsRequest {})
        .await?
        .into_inner()
        .metrics)
}
