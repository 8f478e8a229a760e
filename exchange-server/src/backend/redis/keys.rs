//! Every Redis key and channel of the backend, under the prefix `P`:
//! - `P:schema`: the layout version of the keys below ([`SCHEMA`]);
//! - `P:mb:<id>`: hash of the active mailbox (`s` state: `a`; `t` in a
//!   gravestone written by schema 2, still honoured), `k` kind a/c, `b`
//!   behaviour, `i` implements as JSON, `n` name, `o` owner, `g` subscriber
//!   generation, `e` the highest incarnation (epoch) that subscribed, `l` id
//!   of the last message added, `qb` bytes queued, `r` the replica its
//!   subscriber is on, `p` the peer endpoint that subscriber advertised (direct
//!   delivery), `x` the agent's description, protobuf, if it gave
//!   one: a field replicas of earlier versions leave alone);
//! - `P:q:<id>`: stream of its unacknowledged messages (field `m`, protobuf);
//!   an acknowledged message is deleted, so its length is the queue length;
//! - `P:qz:<id>`: the size (and sender) of each queued message, by stream id,
//!   given back to the mailbox's bound and the sender's quota once it is
//!   acknowledged;
//! - `P:st:<id>`: hash of an agent's saved state (`d` data, `ct` content
//!   type, `v` version, `rev` revision, `e` the saving incarnation, `at` ms
//!   since the epoch), deleted with its mailbox;
//! - `P:dq:<id>`: the queue of a mailbox just terminated, while the exchange
//!   answers the requests left in it;
//! - `P:usage:mailboxes` / `P:usage:bytes`: per principal, the active
//!   mailboxes it owns and the bytes it queued that are not acknowledged yet
//!   (its quotas);
//! - `P:gs:<width>:<slice>:<shard>` (`P:gs:all:<shard>` when kept forever):
//!   gravestones of the agents terminated in one slice of time (`width`
//!   seconds, 1/16 of the retention) whose id falls in one of 1,024 shards,
//!   as a string of 16-byte ids, expiring with the slice (see `expiry.rs`);
//! - `P:idle`: sorted set of client mailboxes by when (ms) they last had no
//!   subscriber, to remove the abandoned ones;
//! - `P:depth`: hash of what is queued unacknowledged in all mailboxes, per
//!   behaviour of the mailbox: `m:<behaviour>` messages, `b:<behaviour>`
//!   bytes (clients: the empty behaviour), kept by the scripts that queue,
//!   acknowledge and release;
//! - `P:replica:<replica>`: present while the replica runs;
//! - `P:idx:<name>` / `P:own:<name>`: discovery index, agents listing a name /
//!   whose own behaviour it is (`P:idx:` lists every active agent); sorted
//!   sets whose members all score 0, so they are ordered by id;
//! - `P:ix:<name>` / `P:ox:<name>`: the same index in schema 1, as sets;
//! - `P:tk:<ticket>` / `P:tkm:<id>`: a direct-delivery ticket's mailbox, and
//!   a mailbox's one ticket, both expiring with the ticket;
//! - `P:b:<key>`: hash of a blob (`o` owner mailbox, `z` size, `x` when it
//!   expires, ms since the epoch, `h` its SHA-256 once every chunk is kept),
//!   `P:bc:<key>:<n>` its chunks, and `P:bo:<id>` the set of a mailbox's
//!   blobs, all expiring with the blobs;
//! - channel `P:bell:<replica>`: notices for a replica's subscriptions.
//!
//! Scripts get every key they touch in `KEYS`, built here.

use academy_proto::{EntityId, RegisteredAgent};

/// The layout version this backend writes. 1 (no `P:schema` key) had the
/// discovery index in sets; 2 has it in sorted sets; 3 keeps gravestones in
/// `P:gs:` strings and idle clients in `P:idle`, instead of terminated
/// mailbox hashes; 4 adds `P:depth`.
pub(super) const SCHEMA: u64 = 4;

#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(super) fn schema(&self) -> String {
        format!("{}:schema", self.prefix)
    }

    pub(super) fn ticket(&self, ticket: &str) -> String {
        format!("{}:tk:{ticket}", self.prefix)
    }

    pub(super) fn ticket_of(&self, id: &EntityId) -> String {
        format!("{}:tkm:{id}", self.prefix)
    }

    /// A blob's hash.
    pub(super) fn blob(&self, key: &str) -> String {
        format!("{}:b:{key}", self.prefix)
    }

    /// Chunk `index` of a blob (`*`, `*` in a pattern: every chunk).
    pub(super) fn blob_chunk(&self, key: &str, index: impl std::fmt::Display) -> String {
        format!("{}:bc:{key}:{index}", self.prefix)
    }

    /// The blobs of a mailbox.
    pub(super) fn blobs_of(&self, owner: &EntityId) -> String {
        format!("{}:bo:{owner}", self.prefix)
    }

    pub(super) fn mailbox(&self, id: &EntityId) -> String {
        format!("{}:mb:{id}", self.prefix)
    }

    pub(super) fn queue(&self, id: &EntityId) -> String {
        format!("{}:q:{id}", self.prefix)
    }

    /// The sizes (and senders) of a mailbox's queued messages.
    pub(super) fn sizes(&self, id: &EntityId) -> String {
        format!("{}:qz:{id}", self.prefix)
    }

    /// Active mailboxes per owner.
    pub(super) fn mailboxes_owned(&self) -> String {
        format!("{}:usage:mailboxes", self.prefix)
    }

    /// Bytes queued unacknowledged per sender.
    pub(super) fn bytes_sent(&self) -> String {
        format!("{}:usage:bytes", self.prefix)
    }

    /// An agent's saved state.
    pub(super) fn state(&self, id: &EntityId) -> String {
        format!("{}:st:{id}", self.prefix)
    }

    /// What is queued per behaviour: messages and bytes.
    pub(super) fn depth(&self) -> String {
        format!("{}:depth", self.prefix)
    }

    /// A mailbox's keys as release.lua takes them (terminate.lua,
    /// forget.lua and abandon.lua open with them).
    pub(super) fn releasing(&self, id: &EntityId) -> Vec<String> {
        vec![
            self.mailbox(id),
            self.queue(id),
            self.sizes(id),
            self.mailboxes_owned(),
            self.bytes_sent(),
            self.depth(),
            self.state(id),
        ]
    }

    /// What was queued in a terminated mailbox, until its requests are answered.
    pub(super) fn drain(&self, id: &EntityId) -> String {
        format!("{}:dq:{id}", self.prefix)
    }

    /// Gravestones of slice `slice` (`all` when kept forever), shard `shard`.
    pub(super) fn gravestones(&self, slice: &str, shard: u16) -> String {
        format!("{}:gs:{slice}:{shard:03x}", self.prefix)
    }

    /// Client mailboxes by when they last had no subscriber.
    pub(super) fn idle_clients(&self) -> String {
        format!("{}:idle", self.prefix)
    }

    /// Present while `replica` runs.
    pub(super) fn replica(&self, replica: &str) -> String {
        format!("{}:replica:{replica}", self.prefix)
    }

    /// The prefix of the replicas' notice channels (a channel, not a key).
    pub(super) fn bell(&self) -> String {
        format!("{}:bell:", self.prefix)
    }

    /// The sorted set of agents listing `name` (`exact`: as their own behaviour).
    pub(super) fn index(&self, name: &str, exact: bool) -> String {
        format!("{}:{}:{name}", self.prefix, if exact { "own" } else { "idx" })
    }

    /// The sorted sets that list `agent`.
    pub(super) fn indexes(&self, agent: &RegisteredAgent) -> Vec<String> {
        self.listing(&agent.behaviour, &agent.implements, "idx", "own")
    }

    /// The schema-1 set of every active agent.
    pub(super) fn schema1_all(&self) -> String {
        format!("{}:ix:", self.prefix)
    }

    /// The schema-1 sets that listed an agent of `behaviour` implementing `implements`.
    pub(super) fn schema1_indexes(&self, behaviour: &str, implements: &[String]) -> Vec<String> {
        self.listing(behaviour, implements, "ix", "ox")
    }

    fn listing(&self, behaviour: &str, implements: &[String], all: &str, own: &str) -> Vec<String> {
        let p = &self.prefix;
        let mut keys = vec![format!("{p}:{all}:"), format!("{p}:{all}:{behaviour}")];
        keys.push(format!("{p}:{own}:{behaviour}"));
        keys.extend(implements.iter().map(|name| format!("{p}:{all}:{name}")));
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_is_listed_under_every_name_it_answers_to() {
        let keys = Keys::new("p");
        let agent = RegisteredAgent {
            id: EntityId::new_agent(),
            behaviour: "b".into(),
            implements: vec!["i".into()],
            name: String::new(),
            owner: String::new(),
            description: None,
            endpoint: String::new(),
        };
        assert_eq!(keys.indexes(&agent), ["p:idx:", "p:idx:b", "p:own:b", "p:idx:i"]);
        assert_eq!(keys.index("b", true), "p:own:b");
        assert_eq!(
            keys.schema1_indexes("b", &["i".into()]),
            ["p:ix:", "p:ix:b", "p:ox:b", "p:ix:i"]
        );
    }
}
