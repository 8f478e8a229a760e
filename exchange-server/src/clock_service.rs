//! The exchange's simulated clock over gRPC (`academy.v1.ClockService`):
//! what [`SimClock`](crate::clock::SimClock) does, for agents and
//! simulators in other processes.

use std::sync::Arc;
use std::time::Duration;

use academy_proto::pb::{self, clock_service_server};
use academy_proto::{ExchangeError, duration};
use futures::StreamExt as _;
use futures::stream::BoxStream;
use tonic::{Request, Response, Status};

use crate::clock::{ClockStatus, Mark, SimClock};
use crate::limits;

type RpcResult<T> = Result<Response<T>, Status>;

/// Serves one exchange's clock.
#[derive(Debug, Clone)]
pub struct ClockGrpc {
    clock: Arc<SimClock>,
}

impl ClockGrpc {
    /// Serves `clock`.
    pub fn new(clock: Arc<SimClock>) -> Self {
        Self { clock }
    }
}

fn now(status: ClockStatus) -> pb::NowResponse {
    status.into()
}

fn time(
    value: Option<academy_proto::prost_types::Duration>,
    field: &str,
) -> Result<Duration, ExchangeError> {
    let value =
        value.ok_or_else(|| ExchangeError::InvalidArgument(format!("{field} is missing")))?;
    duration::from_proto(value, field)
}

#[tonic::async_trait]
impl clock_service_server::ClockService for ClockGrpc {
    async fn now(&self, _request: Request<pb::NowRequest>) -> RpcResult<pb::NowResponse> {
        Ok(Response::new(now(self.clock.status())))
    }

    async fn advance(
        &self,
        request: Request<pb::AdvanceRequest>,
    ) -> RpcResult<pb::AdvanceResponse> {
        use pb::advance_request::Target;
        let req = request.into_inner();
        let until = match req.target {
            Some(Target::Until(until)) => time(Some(until), "until")?,
            Some(Target::By(by)) => self.clock.status().now.saturating_add(time(Some(by), "by")?),
            None => {
                return Err(ExchangeError::InvalidArgument("until or by is missing".into()).into());
            }
        };
        let factor = (req.factor > 0.0).then_some(req.factor);
        let status = self.clock.advance(until, factor).await;
        Ok(Response::new(pb::AdvanceResponse { clock: Some(now(status)) }))
    }

    async fn mark(&self, request: Request<pb::MarkRequest>) -> RpcResult<pb::MarkResponse> {
        let req = request.into_inner();
        let participant = req.participant;
        self.clock.mark(participant, Mark::of(req.kind(), req.key, req.answer_key)?)?;
        Ok(Response::new(pb::MarkResponse {}))
    }

    async fn sleep(&self, request: Request<pb::SleepRequest>) -> RpcResult<pb::SleepResponse> {
        let req = request.into_inner();
        limits::name("key", &req.key)?;
        let until = time(req.until, "until")?;
        let woke = self.clock.sleep(req.participant, &req.key, until)?.await;
        Ok(Response::new(pb::SleepResponse { now: Some(duration::to_proto(woke)) }))
    }

    type ParticipateStream = BoxStream<'static, Result<pb::ParticipateResponse, Status>>;

    /// Names the participant, then stays open: the participant leaves when
    /// the stream is dropped (the call ended, or its connection did).
    async fn participate(
        &self,
        request: Request<pb::ParticipateRequest>,
    ) -> RpcResult<Self::ParticipateStream> {
        let joined = self.clock.rejoin(request.get_ref().resume)?;
        let first = pb::ParticipateResponse { participant: joined.id() };
        let open = futures::stream::once(async move { Ok(first) })
            .chain(futures::stream::pending())
            .map(move |answer| {
                let _stays = &joined;
                answer
            });
        Ok(Response::new(open.boxed()))
    }
}
