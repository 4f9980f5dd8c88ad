//! The Mesos text syntax for resources and attributes, as given on agent command lines:
//!
//! ```text
//! resources:  cpus:2;mem:1024;ports:[31000-32000];disk(eng):100;zones:{a,b}
//! attributes: rack:r1;zone:us-east-1a;level:3;slots:[1-4]
//! ```
//!
//! A resource may name a role in parentheses (a static reservation); `name(role,principal)`
//! is the printed form of a dynamic reservation and parses back to one.

use std::collections::BTreeSet;
use std::fmt;

use crate::resources::{
    Range, Ranges, Reservation, Resource, ResourceError, Resources, Scalar, Value, validate_name,
};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error("{item:?}: expected NAME:VALUE")]
    MissingColon { item: String },
    #[error("{item:?}: unclosed '(' in the name")]
    UnclosedRole { item: String },
    #[error("{item:?}: {value:?} is not a number, a range list [a-b, ...] or a set {{a,b}}")]
    BadValue { item: String, value: String },
    #[error("{item:?}: range {range:?} is not of the form BEGIN-END")]
    BadRange { item: String, range: String },
    #[error("{item:?}: {source}")]
    Invalid {
        item: String,
        #[source]
        source: ResourceError,
    },
}

fn split_items(text: &str) -> impl Iterator<Item = &str> {
    text.split(';').map(str::trim).filter(|s| !s.is_empty())
}

fn split_name_value(item: &str) -> Result<(&str, &str), ParseError> {
    // The value of a range list contains ':'-free text, but a role may not contain ':' either,
    // so the first ':' after the optional "(...)" separates name and value.
    let search_from = item.find('(').map_or(0, |open| {
        item[open..].find(')').map_or(item.len(), |c| open + c)
    });
    let colon = item[search_from..]
        .find(':')
        .map(|i| search_from + i)
        .ok_or_else(|| ParseError::MissingColon {
            item: item.to_owned(),
        })?;
    Ok((item[..colon].trim(), item[colon + 1..].trim()))
}

fn parse_ranges(item: &str, inner: &str) -> Result<Ranges, ParseError> {
    let mut ranges = Vec::new();
    for part in inner.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || ParseError::BadRange {
            item: item.to_owned(),
            range: part.to_owned(),
        };
        let (b, e) = part.split_once('-').ok_or_else(bad)?;
        let begin: u64 = b.trim().parse().map_err(|_| bad())?;
        let end: u64 = e.trim().parse().map_err(|_| bad())?;
        ranges.push(
            Range::new(begin, end).map_err(|source| ParseError::Invalid {
                item: item.to_owned(),
                source,
            })?,
        );
    }
    Ok(Ranges::from_ranges(ranges))
}

fn parse_set(inner: &str) -> BTreeSet<String> {
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Parses a value that must be a scalar, ranges or a set; `None` when it is none of them.
fn parse_value(item: &str, value: &str) -> Result<Option<Value>, ParseError> {
    if let Some(inner) = value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
        return parse_ranges(item, inner).map(|r| Some(Value::Ranges(r)));
    }
    if let Some(inner) = value.strip_prefix('{').and_then(|v| v.strip_suffix('}')) {
        return Ok(Some(Value::Set(parse_set(inner))));
    }
    match value.parse::<f64>() {
        Ok(v) => Scalar::from_f64(v)
            .map(|s| Some(Value::Scalar(s)))
            .map_err(|source| ParseError::Invalid {
                item: item.to_owned(),
                source,
            }),
        Err(_) => Ok(None),
    }
}

/// Parses `cpus:2;mem:1024;ports:[31000-32000];disk(eng):100`.
///
/// # Errors
/// Names the offending item and what is wrong with it.
pub fn parse_resources(text: &str) -> Result<Resources, ParseError> {
    let mut out = Resources::new();
    for item in split_items(text) {
        let (name, value) = split_name_value(item)?;
        let (name, reservation) = match name.split_once('(') {
            None => (name, Reservation::Unreserved),
            Some((n, rest)) => {
                let inner = rest
                    .strip_suffix(')')
                    .ok_or_else(|| ParseError::UnclosedRole {
                        item: item.to_owned(),
                    })?;
                let reservation = match inner.split_once(',') {
                    _ if inner.trim() == "*" => Reservation::Unreserved,
                    None => Reservation::Static {
                        role: inner.trim().to_owned(),
                    },
                    Some((role, principal)) => Reservation::Dynamic {
                        role: role.trim().to_owned(),
                        principal: principal.trim().to_owned(),
                    },
                };
                (n.trim(), reservation)
            }
        };
        let value = parse_value(item, value)?.ok_or_else(|| ParseError::BadValue {
            item: item.to_owned(),
            value: value.to_owned(),
        })?;
        let resource =
            Resource::new(name, reservation, value).map_err(|source| ParseError::Invalid {
                item: item.to_owned(),
                source,
            })?;
        out.push(resource);
    }
    Ok(out)
}

/// The value of an agent attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum AttributeValue {
    Scalar(Scalar),
    Ranges(Ranges),
    Set(BTreeSet<String>),
    Text(String),
}

/// A named property of an agent (`rack:r1`), offered to frameworks beside its resources.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribute {
    pub name: String,
    pub value: AttributeValue,
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.name)?;
        match &self.value {
            AttributeValue::Scalar(s) => write!(f, "{s}"),
            AttributeValue::Ranges(r) => write!(f, "{r}"),
            AttributeValue::Set(s) => write!(f, "{}", Value::Set(s.clone())),
            AttributeValue::Text(t) => f.write_str(t),
        }
    }
}

/// Parses `rack:r1;zone:us-east;level:3;slots:[1-4]`; values that are not numbers, ranges or
/// sets are text.
///
/// # Errors
/// Names the offending item and what is wrong with it.
pub fn parse_attributes(text: &str) -> Result<Vec<Attribute>, ParseError> {
    split_items(text)
        .map(|item| {
            let (name, value) = item
                .split_once(':')
                .ok_or_else(|| ParseError::MissingColon {
                    item: item.to_owned(),
                })?;
            let (name, value) = (name.trim(), value.trim());
            validate_name(name).map_err(|source| ParseError::Invalid {
                item: item.to_owned(),
                source,
            })?;
            let value = match parse_value(item, value)? {
                Some(Value::Scalar(s)) => AttributeValue::Scalar(s),
                Some(Value::Ranges(r)) => AttributeValue::Ranges(r),
                Some(Value::Set(s)) => AttributeValue::Set(s),
                None => AttributeValue::Text(value.to_owned()),
            };
            Ok(Attribute {
                name: name.to_owned(),
                value,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_mesos_example() {
        let r = parse_resources("cpus:2;mem:1024;ports:[31000-32000];disk(role):100").unwrap();
        assert_eq!(r.cpus(), 2.0);
        assert_eq!(r.mem(), 1024.0);
        assert_eq!(r.disk(), 100.0);
        assert_eq!(r.reserved_for("role").disk(), 100.0);
        assert_eq!(r.ranges("ports").count(), 1001);
        // Printing is canonical: sorted by name, then reservation.
        assert_eq!(
            r.to_string(),
            "cpus:2;disk(role):100;mem:1024;ports:[31000-32000]"
        );
    }

    #[test]
    fn parses_sets_multiple_ranges_and_whitespace() {
        let r = parse_resources(" ports : [1-2, 5-9] ; zones:{b,a} ; cpus(*):0.5 ").unwrap();
        assert_eq!(r.to_string(), "cpus:0.5;ports:[1-2, 5-9];zones:{a, b}");
        let d = parse_resources("cpus(eng,alice):1").unwrap();
        assert_eq!(d.to_string(), "cpus(eng,alice):1");
    }

    #[test]
    fn errors_name_the_item() {
        let e = parse_resources("cpus:2;mem").unwrap_err();
        assert_eq!(e.to_string(), "\"mem\": expected NAME:VALUE");
        let e = parse_resources("cpus:lots").unwrap_err();
        assert!(e.to_string().contains("\"lots\" is not a number"), "{e}");
        let e = parse_resources("ports:[9-1]").unwrap_err();
        assert!(e.to_string().contains("beginning after its end"), "{e}");
        let e = parse_resources("cpus:-1").unwrap_err();
        assert!(e.to_string().contains("non-negative"), "{e}");
        let e = parse_resources("cpus(a b):1").unwrap_err();
        assert!(e.to_string().contains("role"), "{e}");
        let e = parse_resources("ports:5").unwrap_err();
        assert!(e.to_string().contains("must be of type ranges"), "{e}");
        let e = parse_resources("cpus(eng:1").unwrap_err();
        assert!(matches!(
            e,
            ParseError::MissingColon { .. } | ParseError::UnclosedRole { .. }
        ));
    }

    #[test]
    fn parses_attributes() {
        let a = parse_attributes("rack:r1;level:3;slots:[1-4];zone:us-east-1a").unwrap();
        assert_eq!(a.len(), 4);
        assert_eq!(a[0].value, AttributeValue::Text("r1".into()));
        assert_eq!(a[1].value, AttributeValue::Scalar(Scalar::from_units(3)));
        assert_eq!(a[2].to_string(), "slots:[1-4]");
        assert_eq!(a[3].to_string(), "zone:us-east-1a");
        assert!(parse_attributes("rack").is_err());
    }
}
