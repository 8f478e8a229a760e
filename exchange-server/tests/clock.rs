//! The exchange's simulated clock over gRPC (`academy.v1.ClockService`;
//! docs/design.md, "Clocks"), as a program in any language uses it: what
//! it counts across connections, and what it refuses.

use std::time::Duration;

use academy_exchange::{ExchangeOptions, RunningExchange};
use academy_proto::duration::to_proto;
use academy_proto::pb::{self, MarkKind, advance_request::Target};
use academy_server::auth::Tokens;
use tonic::Code;

const HOUR: Duration = Duration::from_secs(3600);

type Clock = pb::clock_service_client::ClockServiceClient<tonic::transport::Channel>;

fn mark(kind: MarkKind, key: &str) -> pb::MarkRequest {
    pb::MarkRequest { kind: kind.into(), key: key.into(), ..Default::default() }
}

async fn status(clock: &mut Clock) -> pb::NowResponse {
    clock.now(pb::NowRequest {}).await.unwrap().into_inner()
}

/// Moves `simulator`'s clock on by an hour, in a task: the clock reached.
fn advance_an_hour(simulator: &Clock) -> tokio::task::JoinHandle<pb::NowResponse> {
    let mut simulator = simulator.clone();
    tokio::spawn(async move {
        let request = pb::AdvanceRequest { target: Some(Target::By(to_proto(HOUR))), factor: 0.0 };
        simulator.advance(request).await.unwrap().into_inner().clock.unwrap()
    })
}

/// A task on one connection sleeps; the simulator on another moves time:
/// the task wakes at its time, and time goes no further while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeper_wakes_at_its_time_and_holds_time_while_it_runs() {
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let mut task = Clock::connect(exchange.url()).await.unwrap();
    let mut simulator = Clock::connect(exchange.url()).await.unwrap();
    assert_eq!(status(&mut simulator).await.now, Some(to_proto(Duration::ZERO)));

    task.mark(mark(MarkKind::Begin, "")).await.unwrap();
    let sleep =
        pb::SleepRequest { key: "task".into(), until: Some(to_proto(HOUR)), participant: 0 };
    let asleep = tokio::spawn({
        let mut task = task.clone();
        async move { task.sleep(sleep).await.unwrap().into_inner().now }
    });
    while status(&mut simulator).await.sleepers < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let advance = tokio::spawn({
        let mut simulator = simulator.clone();
        async move {
            let request =
                pb::AdvanceRequest { target: Some(Target::By(to_proto(HOUR * 2))), factor: 0.0 };
            simulator.advance(request).await.unwrap().into_inner().clock.unwrap()
        }
    });
    assert_eq!(asleep.await.unwrap(), Some(to_proto(HOUR)), "woke at its time");
    // Running now: time stays at 1 h until it ends.
    let now = status(&mut simulator).await;
    assert_eq!((now.now, now.pending), (Some(to_proto(HOUR)), 1));
    assert!(!advance.is_finished());
    task.mark(mark(MarkKind::End, "")).await.unwrap();
    let reached = advance.await.unwrap();
    assert_eq!((reached.now, reached.pending, reached.sleepers), (Some(to_proto(HOUR * 2)), 0, 0));
}

/// Malformed requests get INVALID_ARGUMENT naming what is wrong; an
/// exchange that authenticates guards its clock too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_unauthenticated_clock_requests_are_refused() {
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let mut clock = Clock::connect(exchange.url()).await.unwrap();
    let refused = clock.mark(mark(MarkKind::Unspecified, "")).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("kind"), "{}", refused.message());
    let long = "k".repeat(300);
    let refused = clock.mark(mark(MarkKind::Send, &long)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("key") && refused.message().len() < 200,
        "{}",
        refused.message()
    );
    let refused = clock.advance(pb::AdvanceRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let sleep = pb::SleepRequest { key: "k".into(), until: None, participant: 0 };
    let refused = clock.sleep(sleep).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(status(&mut clock).await.pending, 0, "nothing was counted");

    let tokens = Tokens::parse("sim sim-token-0123456789").unwrap();
    let guarded =
        RunningExchange::start(ExchangeOptions { tokens: Some(tokens), ..Default::default() })
            .await
            .unwrap();
    let mut anonymous = Clock::connect(guarded.url()).await.unwrap();
    let request = pb::AdvanceRequest { target: Some(Target::By(to_proto(HOUR))), factor: 0.0 };
    let refused = anonymous.advance(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
}

/// A participant's process goes away (its connection closes) with a task
/// running and an answer awaited: what it left is given up, time moves on,
/// the answer does not count when it comes, and marks naming it are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_whose_connection_closes_leaves_the_clock() {
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let mut simulator = Clock::connect(exchange.url()).await.unwrap();
    let mut callee = Clock::connect(exchange.url()).await.unwrap();
    let mut joined =
        callee.participate(pb::ParticipateRequest::default()).await.unwrap().into_inner();
    let callee_id = joined.message().await.unwrap().unwrap().participant;
    let (participant, caller_call) = {
        // The caller, on a connection of its own, as a process would be.
        let mut caller = Clock::connect(exchange.url()).await.unwrap();
        let mut call =
            caller.participate(pb::ParticipateRequest::default()).await.unwrap().into_inner();
        let participant = call.message().await.unwrap().unwrap().participant;
        assert_ne!(participant, callee_id, "each participant is named apart");
        let by = |kind, key: &str, answer_key: &str| pb::MarkRequest {
            kind: i32::from(kind),
            key: key.into(),
            participant,
            answer_key: answer_key.into(),
        };
        caller.mark(by(MarkKind::Begin, "", "")).await.unwrap();
        caller.mark(by(MarkKind::Begin, "", "")).await.unwrap();
        caller.mark(by(MarkKind::Send, "r", "r/answer")).await.unwrap();
        caller.mark(by(MarkKind::Idle, "", "")).await.unwrap();
        (participant, call)
    };
    let as_callee = |kind, key: &str| pb::MarkRequest {
        kind: i32::from(kind),
        key: key.into(),
        participant: callee_id,
        ..Default::default()
    };
    callee.mark(as_callee(MarkKind::Take, "r")).await.unwrap();
    // The caller's running task, and the callee's.
    assert_eq!(status(&mut simulator).await.pending, 2);
    let advance = advance_an_hour(&simulator);
    // The caller's process goes: its only connection closes (its client
    // and channel were dropped above; this is the last handle on the call).
    assert!(!advance.is_finished());
    drop(caller_call);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while status(&mut simulator).await.pending != 1 {
        assert!(std::time::Instant::now() < deadline, "the caller never left the clock");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Its answer, when the callee sends it, is not counted.
    callee.mark(as_callee(MarkKind::Send, "r/answer")).await.unwrap();
    callee.mark(as_callee(MarkKind::End, "")).await.unwrap();
    let reached = advance.await.unwrap();
    assert_eq!((reached.now, reached.pending), (Some(to_proto(HOUR)), 0));
    let refused = callee
        .mark(pb::MarkRequest { participant, ..as_callee(MarkKind::Begin, "") })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(&format!("participant {participant}")), "{refused:?}");
    let sleep = pb::SleepRequest { key: "k".into(), until: Some(to_proto(HOUR)), participant };
    let refused = callee.sleep(sleep).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    // The callee is still on: its marks count.
    callee.mark(as_callee(MarkKind::Begin, "")).await.unwrap();
    assert_eq!(status(&mut simulator).await.pending, 1);
    drop(joined);
}

/// A participant whose `Participate` call ends (its connection broke) and
/// that calls again naming itself within the grace (5 s) keeps its place:
/// its running task still holds time back, past the grace, until it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_calls_again_within_the_grace_keeps_its_place() {
    let exchange = RunningExchange::start(ExchangeOptions::default()).await.unwrap();
    let mut simulator = Clock::connect(exchange.url()).await.unwrap();
    let participant = {
        let mut first = Clock::connect(exchange.url()).await.unwrap();
        let mut call = first.participate(pb::ParticipateRequest::default()).await.unwrap();
        let participant = call.get_mut().message().await.unwrap().unwrap().participant;
        let begin = pb::MarkRequest { participant, ..mark(MarkKind::Begin, "") };
        first.mark(begin).await.unwrap();
        participant
        // The call and its connection close here.
    };
    let advance = advance_an_hour(&simulator);
    let mut again = Clock::connect(exchange.url()).await.unwrap();
    let resume = pb::ParticipateRequest { resume: participant };
    let mut call = again.participate(resume).await.unwrap().into_inner();
    assert_eq!(call.message().await.unwrap().unwrap().participant, participant);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!advance.is_finished(), "time moved while the participant's task ran");
    assert_eq!(status(&mut simulator).await.pending, 1);
    again.mark(pb::MarkRequest { participant, ..mark(MarkKind::End, "") }).await.unwrap();
    let reached = advance.await.unwrap();
    assert_eq!((reached.now, reached.pending), (Some(to_proto(HOUR)), 0));
    drop(call);
}
