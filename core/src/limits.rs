//! Bounds on every number, string and list that arrives from outside.
//!
//! A number from the wire becomes a [`Duration`], a size or a count only through these
//! checks, so that `1e20`, `NaN` or `-1` is refused at the edge with an error naming the field
//! instead of panicking somewhere inside (`Duration::from_secs_f64` panics on overflow,
//! `Instant + Duration` on a far future). The master, the agent and the executors share one
//! set of limits.

use std::time::Duration;

/// One year, in seconds.
const YEAR: f64 = 365.0 * 24.0 * 3600.0;

/// Longest `failover_timeout` a framework may ask for: one year.
pub const MAX_FAILOVER_TIMEOUT_SECS: f64 = YEAR;
/// Longest decline filter (`refuse_seconds`): one year.
pub const MAX_REFUSE_SECS: f64 = YEAR;
/// Longest `max_duration` of a task: ten years (effectively none, but a real instant).
pub const MAX_TASK_DURATION_SECS: f64 = 10.0 * YEAR;
/// Longest kill or shutdown grace period: one hour.
pub const MAX_GRACE_SECS: f64 = 3600.0;
/// Longest heartbeat interval a master may ask of agents or announce to frameworks: one day.
pub const MAX_HEARTBEAT_SECS: f64 = 24.0 * 3600.0;
/// Largest weight of a role.
pub const MAX_WEIGHT: f64 = 1e6;
/// Largest `pids_max` anyone may ask for (the kernel's own ceiling, `PID_MAX_LIMIT`).
pub const MAX_PIDS: u64 = 4 * 1024 * 1024;

/// Longest free-text field (names, messages, hostnames, users, env values): 4 KiB.
pub const MAX_TEXT: usize = 4096;
/// Longest single environment value or argument: 64 KiB.
pub const MAX_ARG: usize = 64 * 1024;
/// Most entries in a list of a call (tasks, offers, resources, uris, env, args, roles…).
pub const MAX_LIST: usize = 10_000;

/// A value outside its bounds, naming the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field `{field}`: {why}")]
pub struct LimitError {
    pub field: String,
    pub why: String,
}

impl LimitError {
    pub fn new(field: impl Into<String>, why: impl Into<String>) -> Self {
        LimitError {
            field: field.into(),
            why: why.into(),
        }
    }
}

/// A number of seconds from outside as a [`Duration`]: finite, non-negative and at most
/// `max`.
///
/// # Errors
/// Naming `field` and the range when `secs` is outside it.
pub fn seconds(field: &str, secs: f64, max: f64) -> Result<Duration, LimitError> {
    if !secs.is_finite() || !(0.0..=max).contains(&secs) {
        return Err(LimitError::new(
            field,
            format!("{secs} is not a number of seconds from 0 to {max}"),
        ));
    }
    // In range, so the conversion cannot overflow; `try_` keeps it panic-free regardless.
    Duration::try_from_secs_f64(secs).map_err(|e| LimitError::new(field, e.to_string()))
}

/// Checks a finite number within `[min, max]`.
///
/// # Errors
/// Naming `field` when `value` is NaN, infinite or outside the range.
pub fn number(field: &str, value: f64, min: f64, max: f64) -> Result<f64, LimitError> {
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(LimitError::new(
            field,
            format!("{value} is not a number from {min} to {max}"),
        ))
    }
}

/// Checks that a list has at most `max` entries.
///
/// # Errors
/// Naming `field` and both counts.
pub fn count(field: &str, len: usize, max: usize) -> Result<(), LimitError> {
    if len > max {
        Err(LimitError::new(
            field,
            format!("{len} entries; at most {max} are allowed"),
        ))
    } else {
        Ok(())
    }
}

/// Checks that a string is at most `max` bytes long.
///
/// # Errors
/// Naming `field` and both lengths.
pub fn text(field: &str, s: &str, max: usize) -> Result<(), LimitError> {
    if s.len() > max {
        Err(LimitError::new(
            field,
            format!("{} bytes long; at most {max} are allowed", s.len()),
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_refuse_what_would_panic_or_mislead() {
        assert_eq!(
            seconds("f", 1.5, 10.0).unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(seconds("f", 0.0, 10.0).unwrap(), Duration::ZERO);
        for bad in [
            1e20,
            f64::INFINITY,
            f64::NAN,
            -1.0,
            -0.5,
            10.000_001,
            f64::MAX,
        ] {
            let e = seconds("filters.refuse_seconds", bad, 10.0).unwrap_err();
            assert_eq!(e.field, "filters.refuse_seconds", "{bad}");
            assert!(
                e.to_string()
                    .starts_with("field `filters.refuse_seconds`: "),
                "{e}"
            );
        }
        // The largest bound still converts.
        seconds("f", MAX_TASK_DURATION_SECS, MAX_TASK_DURATION_SECS).unwrap();
    }

    #[test]
    fn numbers_counts_and_text() {
        assert_eq!(number("w", 2.0, 0.0, 3.0).unwrap(), 2.0);
        assert!(number("w", f64::NAN, 0.0, 3.0).is_err());
        assert!(number("w", 4.0, 0.0, 3.0).is_err());
        count("l", 3, 3).unwrap();
        assert!(
            count("tasks", 4, 3)
                .unwrap_err()
                .to_string()
                .contains("4 entries")
        );
        text("n", "abc", 3).unwrap();
        assert!(text("name", "abcd", 3).is_err());
    }
}
