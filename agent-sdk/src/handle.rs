//! Handles: call an agent's actions as if they were local async methods.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use academy_proto::EntityId;
use academy_proto::pb::{self, message::Body};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{self, Codec};
use crate::mailbox::Mailbox;
use crate::{Behaviour, HandleError, context};

/// What becomes of an agent's mailbox when it shuts down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MailboxPolicy {
    /// What the agent's [`AgentConfig`](crate::AgentConfig) says (by default:
    /// terminated after a requested shutdown).
    #[default]
    AgentDefault,
    /// Terminated: requests still queued are answered with errors, and the
    /// id can never be registered again.
    Terminate,
    /// Kept: messages keep queuing, and the agent can be run on it again.
    Keep,
}

impl MailboxPolicy {
    /// Whether to terminate, when the policy says.
    pub(crate) fn terminate(self) -> Option<bool> {
        match self {
            Self::AgentDefault => None,
            Self::Terminate => Some(true),
            Self::Keep => Some(false),
        }
    }
}

/// An untyped handle: calls actions by name. Typed handles ([`Handle`]) wrap one.
#[derive(Clone)]
pub struct RawHandle {
    agent: EntityId,
    mailbox: Option<Arc<Mailbox>>,
    timeout: Option<Duration>,
    codec: Codec,
    /// Set once the agent refused the preferred codec; shared by clones.
    json_only: Arc<AtomicBool>,
}

impl fmt::Debug for RawHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawHandle")
            .field("agent", &self.agent)
            .field("mailbox", &self.mailbox.as_ref().map(|m| m.id()))
            .field("timeout", &self.timeout)
            .field("codec", &self.codec)
            .finish()
    }
}

impl RawHandle {
    pub(crate) fn new(agent: EntityId, mailbox: Option<Arc<Mailbox>>) -> Self {
        Self { agent, mailbox, timeout: None, codec: Codec::default(), json_only: Arc::default() }
    }

    /// A handle to `agent` with no mailbox of its own: usable inside an agent
    /// (it sends from the agent's mailbox).
    pub fn unbound(agent: EntityId) -> Self {
        Self::new(agent, None)
    }

    /// The agent's id.
    pub fn id(&self) -> EntityId {
        self.agent
    }

    /// The same handle, with calls failing with [`HandleError::Timeout`] after `timeout`.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self { timeout: Some(timeout), ..self.clone() }
    }

    /// The same handle, encoding arguments with `codec` (MessagePack by default;
    /// the handle falls back to JSON by itself for agents that can't read it).
    pub fn with_codec(&self, codec: Codec) -> Self {
        Self { codec, ..self.clone() }
    }

    /// Inside an agent, its own mailbox; otherwise the one this handle was made with.
    fn mailbox(&self) -> Result<Arc<Mailbox>, HandleError> {
        context::current_mailbox()
            .or_else(|| self.mailbox.clone())
            .ok_or(HandleError::Unbound(self.agent))
    }

    /// Calls `action` with `args` (a tuple of the arguments) and decodes its result.
    pub async fn call<A, T>(&self, action: &str, args: A) -> Result<T, HandleError>
    where
        A: Serialize,
        T: DeserializeOwned,
    {
        let mailbox = self.mailbox()?;
        let mut codec =
            if self.json_only.load(Ordering::Relaxed) { Codec::Json } else { self.codec };
        loop {
            // Large arguments go by reference, freed however the call ends.
            let args = codec.encode(&args).map_err(HandleError::Codec)?;
            let request = Body::ActionRequest(pb::ActionRequest {
                action: action.to_owned(),
                args: Some(args),
            });
            let response = mailbox.request(self.agent, request, self.timeout).await?;
            match response.body {
                Some(Body::ActionResponse(resp)) => {
                    // This caller is the result's reader: its blob goes once
                    // read (a peer's by itself, once read to its end).
                    let exchange = mailbox.exchange();
                    let kept = resp.result.as_ref().and_then(|p| p.blob.clone());
                    let read = mailbox.resolve(resp.result, true).await;
                    if kept
                        .as_ref()
                        .is_some_and(|b| b.store != crate::blob::PEER_STORE || read.is_err())
                    {
                        mailbox.stores().free(kept.as_ref());
                    }
                    let read = read?;
                    // Blobs in the result are read where this handle calls from.
                    let decoded = crate::blob::decoding(exchange, || codec::decode(read.as_ref()));
                    return decoded
                        .map_err(|e| HandleError::Codec(format!("result of {action}: {e}")));
                }
                // The request was not run: safe to send again, in JSON.
                Some(Body::ErrorResponse(err))
                    if err.kind == codec::UNSUPPORTED_CONTENT_TYPE && codec != Codec::Json =>
                {
                    tracing::debug!(agent = %self.agent, "agent reads JSON only");
                    self.json_only.store(true, Ordering::Relaxed);
                    codec = Codec::Json;
                }
                Some(Body::ErrorResponse(err)) => return Err(self.remote_error(action, err)),
                _ => return Err(HandleError::Codec(format!("unexpected answer to {action}"))),
            }
        }
    }

    /// Round-trip time of a ping to the agent (which must be running to answer).
    pub async fn ping(&self) -> Result<Duration, HandleError> {
        let start = Instant::now();
        let mailbox = self.mailbox()?;
        let ping = Body::PingRequest(pb::PingRequest {});
        match mailbox.request(self.agent, ping, self.timeout).await?.body {
            Some(Body::SuccessResponse(_)) => Ok(start.elapsed()),
            Some(Body::ErrorResponse(err)) => Err(self.remote_error("ping", err)),
            _ => Err(HandleError::Codec("unexpected answer to ping".into())),
        }
    }

    /// Asks the agent to shut down, doing with its mailbox what `mailbox`
    /// says. Does not wait for it to stop.
    pub async fn shutdown(&self, mailbox: MailboxPolicy) -> Result<(), HandleError> {
        let body = Body::ShutdownRequest(pb::ShutdownRequest { terminate: mailbox.terminate() });
        Ok(self.mailbox()?.send(self.agent, body).await?)
    }

    fn remote_error(&self, action: &str, err: pb::ErrorResponse) -> HandleError {
        let code = tonic::Code::from_i32(err.code);
        if code == tonic::Code::FailedPrecondition && err.kind == "MailboxTerminated" {
            return HandleError::Terminated(self.agent);
        }
        HandleError::Remote {
            action: action.to_owned(),
            code,
            kind: err.kind,
            message: err.message,
        }
    }
}

/// A typed handle to an agent of behaviour `B`. Its actions are methods
/// (through `Deref` to the generated `B::Actions`), returning
/// `Result<T, HandleError>`. Serialises as the agent id, so it can be passed
/// to another agent, which then calls from its own mailbox.
pub struct Handle<B: Behaviour> {
    actions: B::Actions,
    _behaviour: PhantomData<fn() -> B>,
}

impl<B: Behaviour> Handle<B> {
    pub(crate) fn from_raw(raw: RawHandle) -> Self {
        Self { actions: B::Actions::from(raw), _behaviour: PhantomData }
    }

    /// A handle with no mailbox of its own, for use inside an agent.
    pub fn unbound(agent: EntityId) -> Self {
        Self::from_raw(RawHandle::unbound(agent))
    }

    /// The untyped handle inside.
    pub fn raw(&self) -> &RawHandle {
        self.actions.as_ref()
    }

    /// The agent's id.
    pub fn id(&self) -> EntityId {
        self.raw().agent
    }

    /// The same handle, with a per-call timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self::from_raw(self.raw().with_timeout(timeout))
    }

    /// The same handle, with another codec for arguments.
    pub fn with_codec(&self, codec: Codec) -> Self {
        Self::from_raw(self.raw().with_codec(codec))
    }

    /// See [`RawHandle::ping`].
    pub async fn ping(&self) -> Result<Duration, HandleError> {
        self.raw().ping().await
    }

    /// See [`RawHandle::shutdown`].
    pub async fn shutdown(&self, mailbox: MailboxPolicy) -> Result<(), HandleError> {
        self.raw().shutdown(mailbox).await
    }
}

impl<B: Behaviour> Deref for Handle<B> {
    type Target = B::Actions;

    fn deref(&self) -> &B::Actions {
        &self.actions
    }
}

impl<B: Behaviour> Clone for Handle<B> {
    fn clone(&self) -> Self {
        Self::from_raw(self.raw().clone())
    }
}

impl<B: Behaviour> fmt::Debug for Handle<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle<{}>({})", B::NAME, self.id())
    }
}

impl<B: Behaviour> PartialEq for Handle<B> {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

impl<B: Behaviour> Serialize for Handle<B> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.id())
    }
}

impl<'de, B: Behaviour> serde::Deserialize<'de> for Handle<B> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let id: EntityId = text.parse().map_err(serde::de::Error::custom)?;
        Ok(Self::from_raw(RawHandle::new(id, context::current_mailbox())))
    }
}
