//! Clients for operators and tools: the master's Operator API and the agents' Sandbox API.

use std::time::Duration;

use agora_core::{FrameworkId, TaskId};
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
