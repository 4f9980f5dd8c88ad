//! Id newtypes. Ids arrive from the network as strings; they are validated once here and are
//! never bare strings afterwards, so a task id cannot be passed where an agent id is expected.
//!
//! Ids become directory names on agents (a task's sandbox), so they are restricted to a safe
//! alphabet: no path separators, no `.`/`..`, no whitespace or control characters.

use std::fmt;

/// The longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} id is empty")]
    Empty { kind: &'static str },
    #[error("{kind} id {id:?} is longer than {MAX_ID_LEN} bytes")]
    TooLong { kind: &'static str, id: String },
    #[error("{kind} id {id:?} may not be '.' or '..'")]
    Dots { kind: &'static str, id: String },
    #[error("{kind} id {id:?} contains {c:?}; ids may use letters, digits and . _ - : @ + =")]
    BadChar {
        kind: &'static str,
        id: String,
        c: char,
    },
}

fn validate(kind: &'static str, id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            id: id.to_owned(),
        });
    }
    if id == "." || id == ".." {
        return Err(IdError::Dots {
            kind,
            id: id.to_owned(),
        });
    }
    if let Some(c) = id.chars().find(|c| {
        !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@' | '+' | '='))
    }) {
        return Err(IdError::BadChar {
            kind,
            id: id.to_owned(),
            c,
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `id` and wraps it.
            ///
            /// # Errors
            /// When the id is empty, too long, `.`/`..`, or has a character outside the id
            /// alphabet.
            pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
                let id = id.into();
                validate($kind, &id)?;
                Ok(Self(id))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A framework, assigned by the master when it first subscribes.
    FrameworkId,
    "framework"
);
id_type!(
    /// An agent, assigned by the master when it first registers.
    AgentId,
    "agent"
);
id_type!(
    /// An offer, assigned by the master; valid until accepted, declined or rescinded.
    OfferId,
    "offer"
);
id_type!(
    /// A task, chosen by its framework; unique within the framework.
    TaskId,
    "task"
);
id_type!(
    /// An executor, chosen by its framework.
    ExecutorId,
    "executor"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_usual_ids() {
        for id in ["hello-1", "a", "20261124-0001", "task.v2_x:y@z+w=1"] {
            assert!(TaskId::new(id).is_ok(), "{id}");
        }
    }

    #[test]
    fn rejects_unsafe_ids_with_a_reason() {
        assert_eq!(TaskId::new("").unwrap_err().to_string(), "task id is empty");
        assert!(matches!(TaskId::new(".."), Err(IdError::Dots { .. })));
        assert!(matches!(
            TaskId::new("a/b"),
            Err(IdError::BadChar { c: '/', .. })
        ));
        assert!(matches!(
            AgentId::new("a b"),
            Err(IdError::BadChar { c: ' ', .. })
        ));
        assert!(matches!(
            OfferId::new("x".repeat(256)),
            Err(IdError::TooLong { .. })
        ));
        let err = FrameworkId::new("fw\n").unwrap_err().to_string();
        assert!(err.starts_with("framework id"), "{err}");
    }
}
