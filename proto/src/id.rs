//! Entity ids: `agent:<uuid>` and `client:<uuid>`.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::ExchangeError;

/// Whether an entity is an agent or a client (a plain program).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntityKind {
    /// An agent: serves actions from its mailbox.
    Agent,
    /// A client: a plain program that calls agents.
    Client,
}

/// The id of an entity, which is also the address of its mailbox.
///
/// ```
/// use academy_proto::EntityId;
/// let id = EntityId::new_agent();
/// let parsed: EntityId = id.to_string().parse().unwrap();
/// assert_eq!(id, parsed);
/// assert!("agent:not-a-uuid".parse::<EntityId>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityId {
    kind: EntityKind,
    uuid: Uuid,
}

impl EntityId {
    /// A fresh agent id (UUID v7: ordered by creation time).
    pub fn new_agent() -> Self {
        Self { kind: EntityKind::Agent, uuid: Uuid::now_v7() }
    }

    /// A fresh client id.
    pub fn new_client() -> Self {
        Self { kind: EntityKind::Client, uuid: Uuid::now_v7() }
    }

    /// Agent or client.
    pub fn kind(&self) -> EntityKind {
        self.kind
    }

    /// The UUID part of the id.
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// Whether this is an agent's id.
    pub fn is_agent(&self) -> bool {
        self.kind == EntityKind::Agent
    }

    /// Parses the id in field `field` of a request, with an error naming the field.
    pub fn parse_field(value: &str, field: &str) -> Result<Self, ExchangeError> {
        if value.is_empty() {
            return Err(ExchangeError::InvalidArgument(format!("{field} is empty")));
        }
        value
            .parse()
            .map_err(|e: ExchangeError| ExchangeError::InvalidArgument(format!("{field}: {e}")))
    }
}

impl fmt::Display for EntityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind: &[u8] = match self.kind {
            EntityKind::Agent => b"agent:",
            EntityKind::Client => b"client:",
        };
        // Put together on the stack and written once: every message
        // formats two ids, and `to_string` then allocates once, exactly.
        let mut text = [0; 7 + uuid::fmt::Hyphenated::LENGTH];
        text[..kind.len()].copy_from_slice(kind);
        let end = kind.len() + uuid::fmt::Hyphenated::LENGTH;
        self.uuid.hyphenated().encode_lower(&mut text[kind.len()..end]);
        f.write_str(std::str::from_utf8(&text[..end]).map_err(|_| fmt::Error)?)
    }
}

impl FromStr for EntityId {
    type Err = ExchangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || {
            ExchangeError::InvalidArgument(format!(
                "malformed id {}: expected agent:<uuid> or client:<uuid>",
                crate::excerpt(s)
            ))
        };
        let (kind, rest) = s.split_once(':').ok_or_else(malformed)?;
        let kind = match kind {
            "agent" => EntityKind::Agent,
            "client" => EntityKind::Client,
            _ => return Err(malformed()),
        };
        let uuid = Uuid::try_parse(rest).map_err(|_| malformed())?;
        if !matches!(uuid.get_version_num(), 4 | 7) {
            return Err(ExchangeError::InvalidArgument(format!(
                "id {} is not a UUID v4 or v7",
                crate::excerpt(s)
            )));
        }
        Ok(Self { kind, uuid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let client = EntityId::new_client();
        assert_eq!(client.to_string().parse::<EntityId>().unwrap(), client);
        assert!(client.to_string().starts_with("client:"));
        let v4 = format!("agent:{}", Uuid::new_v4());
        assert!(v4.parse::<EntityId>().unwrap().is_agent());
        // Printed exactly as parsed, lower case.
        let upper = "client:0190F3A2-7B4C-7D8E-9F01-23456789ABCD";
        let id = upper.parse::<EntityId>().unwrap();
        assert_eq!(id.to_string(), upper.to_lowercase());
        assert_eq!(v4.parse::<EntityId>().unwrap().to_string(), v4);
        for bad in
            ["", "agent", "agent:", "robot:00000000-0000-4000-8000-000000000000", "agent:xyz"]
        {
            assert!(bad.parse::<EntityId>().is_err(), "{bad} parsed");
        }
        let nil = format!("agent:{}", Uuid::nil());
        assert!(nil.parse::<EntityId>().is_err());
    }
}
