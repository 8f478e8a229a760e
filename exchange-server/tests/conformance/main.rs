//! The exchange's rules (docs/design.md), over gRPC against a real server on
//! loopback: one conformance suite, every rule run unchanged against the
//! in-memory and the Redis backend (a real `redis-server` per test, which
//! must be installed). One file per rule; each names its design section.

mod blobs;
#[path = "../common/mod.rs"]
mod common;
mod delivery;
mod discovery;
mod harness;
mod lifecycle;
mod limits;
mod metrics;
mod ownership;
mod retention;
mod session;
mod state;

/// Runs each `rule::test` against both backends, as `memory::test` and
/// `redis::test`.
macro_rules! conformance {
    ($($rule:ident :: $test:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { crate::$rule::$test(crate::harness::Store::Memory).await })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { crate::$rule::$test(crate::harness::Store::Redis).await })*
        }
    };
}

conformance!(
    lifecycle::status_lifecycle_and_idempotent_terminate,
    lifecycle::send_to_unknown_id_is_not_found,
    lifecycle::terminated_mailbox_refuses_send_subscribe_and_reregistration,
    lifecycle::terminate_answers_queued_requests_with_errors_of_the_same_tag,
    lifecycle::terminate_answers_every_request_of_a_long_queue,
    lifecycle::status_says_whether_a_subscriber_listens,
    lifecycle::shutdown_ends_open_subscriptions_promptly,
    lifecycle::terminate_answers_within_the_requesters_bounds,
    discovery::discovery_by_name_interface_and_without_terminated_agents,
    discovery::discovery_pages_through_large_answers,
    discovery::agents_describe_themselves,
    discovery::subscribers_advertise_their_peer_endpoint,
    delivery::unacknowledged_messages_are_redelivered_to_the_next_subscriber,
    delivery::a_new_subscriber_supersedes_the_old_one,
    delivery::messages_from_one_sender_arrive_in_order,
    delivery::send_batch_reports_each_message,
    delivery::invoke_reports_unknown_agents_and_times_out_on_idle_ones,
    delivery::a_later_incarnation_fences_the_earlier_ones,
    delivery::concurrent_subscriptions_leave_exactly_one,
    limits::oversized_message_and_full_mailbox_are_resource_exhausted,
    limits::malformed_input_is_invalid_argument_and_the_server_keeps_running,
    limits::requests_beyond_the_protocol_limits_are_refused_naming_them,
    limits::a_mailbox_holds_a_bounded_number_of_bytes,
    limits::deliveries_fit_what_a_default_client_accepts,
    limits::undecodable_and_oversized_requests_get_the_documented_codes,
    ownership::mailboxes_belong_to_the_principal_that_registered_them,
    ownership::principals_are_held_to_their_quotas,
    ownership::a_revoked_token_ends_the_streams_it_opened,
    ownership::discovery_tells_whose_agents_they_are,
    ownership::tickets_are_issued_to_whoever_may_send_from_the_mailbox,
    ownership::a_revoked_token_takes_its_tickets_with_it,
    metrics::metrics_count_calls_messages_and_subscriptions,
    metrics::queue_depth_counts_what_is_queued_per_behaviour,
    state::an_agent_saves_its_state_fenced_by_epoch_and_revision,
    state::only_the_owner_reads_or_writes_an_agents_state,
    state::a_commit_saves_acknowledges_and_answers_in_one_step,
    session::a_session_sends_subscribes_acknowledges_and_commits,
    session::sends_on_a_session_keep_their_order,
    session::a_subscription_waits_for_credit,
    session::a_session_is_held_to_the_limits_and_the_owners,
    retention::a_terminated_client_leaves_no_gravestone,
    retention::gravestones_expire_after_their_retention,
    retention::abandoned_clients_expire_and_give_their_quota_back,
    blobs::blobs_are_put_read_in_chunks_and_freed,
    blobs::blob_puts_are_checked_and_a_failed_one_keeps_nothing,
    blobs::blobs_expire_at_their_ttl,
    blobs::blobs_belong_to_whoever_may_send_from_their_owner,
);
