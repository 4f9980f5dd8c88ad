//! Clients for operators and tools: the master's Operator API and the agents' Sandbox API.

use std::time::Duration;

use agora_core::{FrameworkId, Resources, TaskId};
use agora_proto::resources_to_proto;
use agora_proto::v1::{self, operator_client::OperatorClient, sandbox_client::SandboxClient};
use tonic::transport::{Channel, Endpoint};

use crate::Error;

async fn channel(addr: &str) -> Result<Channel, Error> {
    Endpoint::from_shared(addr.to_owned())
        .map_err(|e| Error::Invalid(format!("address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| Error::Connection(format!("connecting to {addr}: {e}")))
}

/// A client of the master's Operator API.
#[derive(Debug, Clone)]
pub struct Operator {
    client: OperatorClient<Channel>,
}

impl Operator {
    /// # Errors
    /// [`Error::Connection`] when the master cannot be reached.
    pub async fn connect(master: &str) -> Result<Self, Error> {
        Ok(Operator {
            client: OperatorClient::new(channel(master).await?),
        })
    }

    /// Agents, frameworks and tasks, as of the master's latest snapshot.
    ///
    /// # Errors
    /// When the call fails.
    pub async fn state(&self) -> Result<v1::GetStateResponse, Error> {
        Ok(self
            .client
            .clone()
            .get_state(v1::GetStateRequest {})
            .await?
            .into_inner())
    }

    /// # Errors
    /// When the call fails.
    pub async fn health(&self) -> Result<v1::GetHealthResponse, Error> {
        Ok(self
            .client
            .clone()
            .get_health(v1::GetHealthRequest {})
            .await?
            .into_inner())
    }

    /// Roles with their weights, quotas, allocations and reservations.
    ///
    /// # Errors
    /// When the call fails.
    pub async fn roles(&self) -> Result<Vec<v1::RoleState>, Error> {
        Ok(self
            .client
            .clone()
            .get_roles(v1::GetRolesRequest {})
            .await?
            .into_inner()
            .roles)
    }

    /// Sets a role's weight.
    ///
    /// # Errors
    /// [`Error::Refused`] when the role or weight is invalid.
    pub async fn set_weight(&self, role: &str, weight: f64) -> Result<(), Error> {
        self.client
            .clone()
            .update_weight(v1::UpdateWeightRequest {
                role: role.to_owned(),
                weight,
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
        self.client
            .clone()
            .update_quota(v1::UpdateQuotaRequest {
                role: role.to_owned(),
                guarantee: resources_to_proto(guarantee),
                limit: limit.map(resources_to_proto).unwrap_or_default(),
                force,
            })
            .await?;
        Ok(())
    }
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
