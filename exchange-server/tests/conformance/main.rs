//! The exchange's rules (docs/design.md), over gRPC against a real server on
//! loopback: one conformance suite, every rule run unchanged against the
//! in-memory and the Redis backend (a real `redis-server` per test, which
//! must be installed). One file per rule; each names its design section.

#[path = "../common/mod.rs"]
mod common;
mod delivery;
mod discovery;
mod harness;
mod lifecycle;
mod limits;
mod metrics;
mod ownership;

/// Runs each `rule::test` against both backends, as `memory::test` and
/// `redis::test`.
macro_rules! conformance {
    ($($rule:ident :: $test:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test] async fn $test() { crate::$rule::$test(crate::harness::Store::Memory).await })*
        }
        mod redis {
            $(#[tokio::test] async fn $test() { crate::$rule::$test(crate::harness::Store::Redis).await })*
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
    discovery::discovery_by_name_interface_and_without_terminated_agents,
    discovery::discovery_pages_through_large_answers,
    delivery::unacknowledged_messages_are_redelivered_to_the_next_subscriber,
    delivery::a_new_subscriber_supersedes_the_old_one,
    delivery::messages_from_one_sender_arrive_in_order,
    delivery::send_batch_reports_each_message,
    delivery::invoke_reports_unknown_agents_and_times_out_on_idle_ones,
    limits::oversized_message_and_full_mailbox_are_resource_exhausted,
    limits::malformed_input_is_invalid_argument_and_the_server_keeps_running,
    ownership::mailboxes_belong_to_the_principal_that_registered_them,
    metrics::metrics_count_calls_messages_and_subscriptions,
);
