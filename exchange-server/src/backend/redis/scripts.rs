//! The Lua scripts (`scripts/*.lua`, each opening with its KEYS/ARGV
//! contract), run by hash and loaded again whenever Redis lost them.

use academy_proto::{EntityId, ExchangeError};
use redis::Value;

use super::conn::Conn;
use super::reply::unavailable;

/// A Lua script, run by its hash (EVALSHA) and loaded again whenever Redis
/// lost it (a restart, SCRIPT FLUSH).
#[derive(Debug)]
pub(super) struct Lua {
    body: &'static str,
    sha: String,
}

impl Lua {
    fn new(body: &'static str) -> Self {
        Self { body, sha: redis::Script::new(body).get_hash().to_owned() }
    }

    /// `EVALSHA` of this script on `keys`; add its arguments to it.
    pub(super) fn call(&self, keys: &[String]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(keys.len()).arg(keys);
        cmd
    }
}

/// Every script of the backend.
#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) create: Lua,
    pub(super) enqueue: Lua,
    pub(super) terminate: Lua,
    pub(super) subscribe: Lua,
    pub(super) unsubscribe: Lua,
    pub(super) acknowledge: Lua,
    pub(super) forget: Lua,
    pub(super) migrate_agent: Lua,
    pub(super) buried: Lua,
    pub(super) abandon: Lua,
    pub(super) commit: Lua,
    pub(super) load_state: Lua,
    pub(super) blob_chunk: Lua,
    pub(super) blob_finish: Lua,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            create: Lua::new(concat!(
                include_str!("scripts/gravestones.lua"),
                include_str!("scripts/create.lua")
            )),
            enqueue: Lua::new(concat!(
                include_str!("scripts/enqueue.lua"),
                "return enqueue(KEYS, ARGV)\n"
            )),
            terminate: Lua::new(concat!(
                include_str!("scripts/release.lua"),
                include_str!("scripts/terminate.lua")
            )),
            subscribe: Lua::new(include_str!("scripts/subscribe.lua")),
            unsubscribe: Lua::new(include_str!("scripts/unsubscribe.lua")),
            acknowledge: Lua::new(concat!(
                include_str!("scripts/acknowledge.lua"),
                "return acknowledge(KEYS, ARGV)\n"
            )),
            forget: Lua::new(concat!(
                include_str!("scripts/release.lua"),
                include_str!("scripts/forget.lua")
            )),
            migrate_agent: Lua::new(include_str!("scripts/migrate_agent.lua")),
            buried: Lua::new(concat!(
                include_str!("scripts/gravestones.lua"),
                include_str!("scripts/buried.lua")
            )),
            abandon: Lua::new(concat!(
                include_str!("scripts/release.lua"),
                include_str!("scripts/abandon.lua")
            )),
            commit: Lua::new(concat!(
                include_str!("scripts/save_state.lua"),
                include_str!("scripts/acknowledge.lua"),
                include_str!("scripts/enqueue.lua"),
                include_str!("scripts/commit.lua")
            )),
            load_state: Lua::new(include_str!("scripts/load_state.lua")),
            blob_chunk: Lua::new(include_str!("scripts/blob_chunk.lua")),
            blob_finish: Lua::new(include_str!("scripts/blob_finish.lua")),
        }
    }
}

fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(e) if e.code() == "NOSCRIPT")
}

fn pipeline(calls: impl IntoIterator<Item = redis::Cmd>) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for call in calls {
        pipe.add_command(call);
    }
    pipe
}

/// Runs script calls in one pipeline, in order; one answer each (a failed
/// call answers `Value::ServerError`). Calls that found the script missing
/// had no effect: they are sent again once it is loaded.
pub(super) async fn run(
    conn: &Conn,
    lua: &Lua,
    calls: Vec<redis::Cmd>,
) -> Result<Vec<Value>, ExchangeError> {
    let pipe = pipeline(calls);
    let mut answers = conn.pipeline(&pipe).await.map_err(unavailable)?;
    let missing: Vec<usize> = (0..answers.len()).filter(|i| is_noscript(&answers[*i])).collect();
    if !missing.is_empty() {
        let _: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(lua.body)
            .query_async(&mut conn.clone())
            .await
            .map_err(unavailable)?;
        // Rare: only the calls to send again are copied.
        let retry = pipe.cmd_iter().enumerate().filter(|(i, _)| missing.contains(i));
        let again = pipeline(retry.map(|(_, call)| call.clone()));
        let again = conn.pipeline(&again).await.map_err(unavailable)?;
        for (i, answer) in missing.into_iter().zip(again) {
            answers[i] = answer;
        }
    }
    Ok(answers)
}

/// Runs one script call.
pub(super) async fn run_one(
    conn: &Conn,
    lua: &Lua,
    call: redis::Cmd,
) -> Result<Value, ExchangeError> {
    match run(conn, lua, vec![call]).await?.pop() {
        Some(Value::ServerError(e)) => Err(ExchangeError::Unavailable(e.to_string())),
        Some(answer) => Ok(answer),
        None => Err(ExchangeError::Unavailable("Redis gave no answer".into())),
    }
}

/// What a script said about a mailbox it looked at: `missing`, `terminated`,
/// or `denied` with the owner (`owner` reads it from the reply).
pub(super) fn state_error(
    id: &EntityId,
    answer: &str,
    owner: impl FnOnce() -> Option<String>,
) -> Option<ExchangeError> {
    match answer {
        "missing" => Some(ExchangeError::NotFound(*id)),
        "terminated" => Some(ExchangeError::Terminated(*id)),
        "denied" => Some(ExchangeError::PermissionDenied { id: *id, owner: owner()? }),
        _ => None,
    }
}

/// The caller as a script argument: empty when trusted.
pub(super) fn caller_arg(caller: Option<&str>) -> &str {
    caller.unwrap_or_default()
}
