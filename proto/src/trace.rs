//! W3C trace context on messages (`Header.traceparent` and `tracestate`),
//! and the spans Academy's processes record around them.
//!
//! Spans go to OpenTelemetry's global tracer provider, which a binary
//! installs when told where to export (`academy_server::telemetry`, from the
//! `OTEL_*` variables) and then calls [`set_recording`]. Until then nothing
//! here allocates or parses: [`Traced`] only passes on the context it was
//! given, so a trace a caller started still reaches the next process.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
};
use opentelemetry::{Context, KeyValue, global};

use crate::pb;

static RECORDING: AtomicBool = AtomicBool::new(false);

/// Says that a tracer provider is installed, so spans are worth recording.
pub fn set_recording(on: bool) {
    RECORDING.store(on, Ordering::Relaxed);
}

/// Whether spans are recorded (a tracer provider is installed).
pub fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed)
}

fn lower_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The span a `traceparent` (and `tracestate`) names, if it is valid W3C
/// trace context: `00-<32 hex>-<16 hex>-<2 hex>`, ids not all zeros
/// (later versions may append fields; version `ff` is invalid).
pub fn parse(traceparent: &str, tracestate: &str) -> Option<SpanContext> {
    let mut fields = traceparent.split('-');
    let (version, trace, span, flags) =
        (fields.next()?, fields.next()?, fields.next()?, fields.next()?);
    let valid = lower_hex(version, 2)
        && version != "ff"
        && (version != "00" || fields.next().is_none())
        && lower_hex(trace, 32)
        && lower_hex(span, 16)
        && lower_hex(flags, 2);
    if !valid {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok().filter(|id| *id != TraceId::INVALID)?;
    let span_id = SpanId::from_hex(span).ok().filter(|id| *id != SpanId::INVALID)?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & TraceFlags::SAMPLED.to_u8());
    let state = tracestate.parse::<TraceState>().unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, flags, true, state))
}

/// `traceparent` and `tracestate` of `span` (empty when it is not valid).
pub fn format(span: &SpanContext) -> (String, String) {
    if !span.is_valid() {
        return (String::new(), String::new());
    }
    let parent =
        format!("00-{}-{}-{:02x}", span.trace_id(), span.span_id(), span.trace_flags().to_u8());
    (parent, span.trace_state().header())
}

/// A context whose current span is the one `header` names (empty if none).
pub fn of_header(header: &pb::Header) -> Context {
    remote(&header.traceparent, &header.tracestate)
}

/// A context whose current span is the remote one `traceparent` and
/// `tracestate` name (empty if they name none).
pub fn remote(traceparent: &str, tracestate: &str) -> Context {
    match parse(traceparent, tracestate) {
        Some(span) => Context::new().with_remote_span_context(span),
        None => Context::new(),
    }
}

/// The remote span in gRPC metadata `traceparent`/`tracestate` (as any
/// OpenTelemetry-instrumented gRPC client sends it).
pub fn of_metadata(metadata: &tonic::metadata::MetadataMap) -> Context {
    let text = |key| metadata.get(key).and_then(|v| v.to_str().ok()).unwrap_or_default();
    remote(text("traceparent"), text("tracestate"))
}

/// Writes the current span of `cx` into `header`, if it has one.
pub fn stamp(header: &mut pb::Header, cx: &Context) {
    let span = cx.span();
    let span = span.span_context();
    if span.is_valid() {
        (header.traceparent, header.tracestate) = format(span);
    }
}

/// The trace id of `cx`'s span, as 32 hex digits, for log lines.
pub fn trace_id(cx: &Context) -> Option<String> {
    let span = cx.span();
    let span = span.span_context();
    span.is_valid().then(|| span.trace_id().to_string())
}

/// A span of Academy's (while recording), ended when dropped; otherwise the
/// context it was started under, passed on unchanged.
#[derive(Debug)]
pub struct Traced {
    cx: Context,
    own: bool,
}

impl Traced {
    /// Starts span `name` of `kind` under `parent`, with `attributes`; the
    /// closures run only while recording.
    pub fn start(
        name: impl FnOnce() -> String,
        kind: SpanKind,
        parent: Context,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Self {
        if !recording() {
            return Self { cx: parent, own: false };
        }
        let tracer = global::tracer("academy");
        let span = tracer
            .span_builder(name())
            .with_kind(kind)
            .with_attributes(attributes())
            .start_with_context(&tracer, &parent);
        Self { cx: parent.with_span(span), own: true }
    }

    /// A span that starts and ends now (an event in a message's life).
    pub fn mark(
        name: impl FnOnce() -> String,
        kind: SpanKind,
        parent: impl FnOnce() -> Context,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) {
        if recording() {
            drop(Self::start(name, kind, parent(), attributes));
        }
    }

    /// The context to run under and to pass on: this span, or the parent.
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// Marks the span failed, with `message` (its own span only).
    pub fn fail(&self, message: &str) {
        if self.own {
            self.cx.span().set_status(Status::error(message.to_owned()));
        }
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if self.own {
            self.cx.span().end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips() {
        let span = parse(PARENT, "vendor=value").unwrap();
        assert!(span.is_sampled() && span.is_remote());
        assert_eq!(format(&span), (PARENT.to_owned(), "vendor=value".to_owned()));
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!parse(unsampled, "").unwrap().is_sampled());
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad, "").is_none(), "{bad:?}");
        }
        // A later version may add fields.
        assert!(
            parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", "").is_some()
        );
    }

    #[test]
    fn without_a_provider_the_context_is_passed_on() {
        let parent = remote(PARENT, "");
        let traced = Traced::start(|| unreachable!(), SpanKind::Server, parent, || unreachable!());
        let mut header = pb::Header::default();
        stamp(&mut header, traced.context());
        assert_eq!(header.traceparent, PARENT);
        assert_eq!(trace_id(traced.context()).unwrap(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut untouched = pb::Header::default();
        stamp(&mut untouched, &Context::new());
        assert!(untouched.traceparent.is_empty());
    }
}
