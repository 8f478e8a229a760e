//! `google.protobuf.Duration` ↔ `std::time::Duration`.

use std::time::Duration;

use crate::ExchangeError;

/// A request's duration field `field`; negative or out-of-range durations are
/// refused, naming the field.
pub fn from_proto(value: prost_types::Duration, field: &str) -> Result<Duration, ExchangeError> {
    Duration::try_from(value)
        .map_err(|_| ExchangeError::InvalidArgument(format!("{field} is negative or out of range")))
}

/// A duration as a `google.protobuf.Duration` (saturating past ~292 billion years).
pub fn to_proto(value: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(value)
        .unwrap_or(prost_types::Duration { seconds: i64::MAX, nanos: 999_999_999 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_negative_durations() {
        let d = Duration::from_millis(1500);
        assert_eq!(from_proto(to_proto(d), "timeout").unwrap(), d);
        let negative = prost_types::Duration { seconds: -1, nanos: 0 };
        let err = from_proto(negative, "timeout").unwrap_err();
        assert_eq!(err.to_string(), "timeout is negative or out of range");
    }
}
