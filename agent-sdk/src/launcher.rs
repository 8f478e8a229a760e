//! A client of the launcher: launch agents on worker nodes, stop them, look
//! them up. [`Manager::launch_remote`](crate::Manager::launch_remote) returns
//! typed handles to them.

use std::collections::HashMap;

use academy_proto::EntityId;
use academy_proto::pb::{self, launcher_service_client::LauncherServiceClient};
use serde::Serialize;

use crate::credentials::{Authorized, Credentials};
use crate::{Behaviour, ClientError, MailboxPolicy};

/// How to launch an agent through the launcher.
#[derive(Debug, Clone, Default)]
pub struct RemoteLaunch {
    /// Human-readable name, shown by discovery.
    pub name: String,
    /// Labels the worker must carry.
    pub selector: HashMap<String, String>,
    /// Restarts allowed after failures.
    pub retry_limit: u32,
}

/// Talks to an `academy-launcher`.
#[derive(Debug, Clone)]
pub struct Launcher {
    rpc: LauncherServiceClient<Authorized>,
}

impl Launcher {
    /// Connects to the launcher at `url`, with the token in `ACADEMY_TOKEN` if set.
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Self::connect_with(url, &Credentials::from_env()?).await
    }

    /// Connects to the launcher at `url`, presenting `credentials`.
    pub async fn connect_with(url: &str, credentials: &Credentials) -> Result<Self, ClientError> {
        Ok(Self { rpc: LauncherServiceClient::new(credentials.connect(url).await?) })
    }

    /// Launches behaviour `B`, built on a worker from `config` (as JSON).
    pub async fn launch<B: Behaviour>(
        &self,
        config: &impl Serialize,
        options: RemoteLaunch,
    ) -> Result<pb::AgentRecord, ClientError> {
        let config = serde_json::to_value(config)
            .map_err(|e| ClientError::Transport(format!("config does not serialise: {e}")))?;
        let request = pb::LaunchAgentRequest {
            behaviour: B::NAME.to_owned(),
            config: Some(academy_proto::json::to_proto(config)),
            name: options.name,
            selector: options.selector,
            retry_limit: options.retry_limit,
        };
        let agent = self.rpc.clone().launch_agent(request).await?.into_inner().agent;
        agent.ok_or_else(|| ClientError::Transport("the launcher returned no record".into()))
    }

    /// The launcher's record of agent `id`.
    pub async fn get(&self, id: EntityId) -> Result<pb::AgentRecord, ClientError> {
        let request = pb::GetAgentRequest { agent_id: id.to_string() };
        let agent = self.rpc.clone().get_agent(request).await?.into_inner().agent;
        agent.ok_or_else(|| ClientError::Transport("the launcher returned no record".into()))
    }

    /// Stops an agent, terminating its mailbox or keeping it
    /// ([`MailboxPolicy::AgentDefault`] keeps it: a stop through the launcher
    /// leaves the mailbox to whoever terminates it).
    pub async fn stop(&self, id: EntityId, mailbox: MailboxPolicy) -> Result<(), ClientError> {
        let terminate = mailbox == MailboxPolicy::Terminate;
        self.rpc
            .clone()
            .stop_agent(pb::StopAgentRequest { agent_id: id.to_string(), terminate })
            .await?;
        Ok(())
    }
}
