//! Finding the leading master: try the masters of a list in turn and follow redirects.
//!
//! [`find_leader`] is the one search every client runs — the scheduler driver, the agent's
//! link, the operator client, blob uploads. It is given the list and an `attempt` that makes
//! the client's own call against one master and says what the answer meant ([`Failure`]).
//! It owns no transport: the attempt dials, so gRPC and HTTP callers share it.
//!
//! One search: the masters in the order given; a master that names the leader sends the
//! search there (at most [`DialPolicy::max_hops`] redirects from each master of the list); a round in which some master
//! answered as a follower but none led (an election) is followed by another after a short
//! wait; a round in which no master answered at all ends the search. Every search ends
//! within [`DialPolicy::deadline`], with an error naming each master tried and why it was
//! not the one.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Limits of one search for the leader.
#[derive(Debug, Clone)]
pub struct DialPolicy {
    /// Most redirects followed from one master of the list before going on to the next.
    /// Default 8.
    pub max_hops: u32,
    /// Wait before another round of the list when masters answered but none leads yet.
    /// Default 100 ms, doubling each round up to `retry_max`.
    pub retry_min: Duration,
    /// Longest wait between rounds. Default 1 s.
    pub retry_max: Duration,
    /// Longest one master may take to answer before the next is tried. Default 10 s.
    pub attempt_timeout: Duration,
    /// Longest one search takes, attempts and waits included. Default 20 s.
    pub deadline: Duration,
}

impl Default for DialPolicy {
    fn default() -> Self {
        DialPolicy {
            max_hops: 8,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(20),
        }
    }
}

/// Why an attempt against one master did not succeed.
#[derive(Debug)]
pub enum Failure<E> {
    /// The master does not lead; it names the leader (a URL with scheme), or knows none.
    NotLeader(Option<String>),
    /// The master could not be reached, or failed; another may do.
    Unreachable(String),
    /// The master understood the request and refused it: the search stops.
    Refused(E),
}

impl<E> Failure<E> {
    /// The same failure with the refusal converted.
    pub fn map<F>(self, f: impl FnOnce(E) -> F) -> Failure<F> {
        match self {
            Failure::NotLeader(l) => Failure::NotLeader(l),
            Failure::Unreachable(why) => Failure::Unreachable(why),
            Failure::Refused(e) => Failure::Refused(f(e)),
        }
    }
}

impl From<tonic::Status> for Failure<tonic::Status> {
    /// A redirect ([`crate::leader::redirect`]) is [`Failure::NotLeader`]; the codes of a
    /// broken connection or a failing master are [`Failure::Unreachable`]; the rest are
    /// refusals.
    fn from(status: tonic::Status) -> Self {
        use tonic::Code::*;
        if let Some(leader) = crate::leader::redirect(&status) {
            return Failure::NotLeader(leader);
        }
        match status.code() {
            Unavailable | Unknown | Internal | Cancelled | DeadlineExceeded | Aborted
            | DataLoss => Failure::Unreachable(status.message().to_owned()),
            _ => Failure::Refused(status),
        }
    }
}

/// No master was found leading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoLeader {
    /// Why the search ended.
    pub reason: String,
    /// Each master tried, in the order first tried, with its last answer.
    pub tried: Vec<(String, String)>,
}

impl fmt::Display for NoLeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reason)?;
        for (i, (master, why)) in self.tried.iter().enumerate() {
            write!(f, "{} {master}: {why}", if i == 0 { ":" } else { ";" })?;
        }
        Ok(())
    }
}

/// How a search failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError<E> {
    /// A master refused the request.
    #[error("{master} refused the request: {error}")]
    Refused { master: String, error: E },
    #[error("{0}")]
    NoLeader(NoLeader),
}

/// The order to search `masters` in after a break: `first` (a leader some master named)
/// leads, `last` (the master that was lost: the least likely to lead now) goes to the end.
pub fn order(masters: &[String], first: Option<&str>, last: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = first.map(str::to_owned).into_iter().collect();
    out.extend(
        masters
            .iter()
            .filter(|m| Some(m.as_str()) != first && Some(m.as_str()) != last)
            .cloned(),
    );
    if let Some(l) = last
        && Some(l) != first
        && masters.iter().any(|m| m == l)
    {
        out.push(l.to_owned());
    }
    out
}

/// Searches `masters` for the leader: `attempt(url)` makes the caller's call against one
/// master. Returns the leader's URL and what its attempt returned.
///
/// # Errors
/// [`DialError::Refused`] as soon as a master refuses; [`DialError::NoLeader`] when a whole
/// round found no master answering (as leader or follower), or the deadline passed.
pub async fn find_leader<T, E, F, Fut>(
    masters: &[String],
    policy: &DialPolicy,
    mut attempt: F,
) -> Result<(String, T), DialError<E>>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<T, Failure<E>>>,
{
    let deadline = Instant::now() + policy.deadline;
    let mut tried: Vec<(String, String)> = Vec::new();
    let note = |tried: &mut Vec<(String, String)>, master: &str, why: String| match tried
        .iter_mut()
        .find(|(m, _)| m == master)
    {
        Some(entry) => entry.1 = why,
        None => tried.push((master.to_owned(), why)),
    };
    let give_up = |reason: String, tried: Vec<(String, String)>| {
        Err(DialError::NoLeader(NoLeader { reason, tried }))
    };
    if masters.is_empty() {
        return give_up("no master to try".into(), tried);
    }
    let mut delay = policy.retry_min;
    loop {
        // Some master answered as a follower this round: a leader may be elected soon.
        let mut followers = false;
        for first in masters {
            let mut hops = 0u32;
            let mut next = Some(first.clone());
            while let Some(url) = next.take() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return give_up(
                        format!("no leader found within {:?}", policy.deadline),
                        tried,
                    );
                }
                let wait = left.min(policy.attempt_timeout);
                let answer = match tokio::time::timeout(wait, attempt(url.clone())).await {
                    Ok(answer) => answer,
                    Err(_) => Err(Failure::Unreachable(format!("no answer within {wait:?}"))),
                };
                match answer {
                    Ok(t) => return Ok((url, t)),
                    Err(Failure::Refused(error)) => {
                        return Err(DialError::Refused { master: url, error });
                    }
                    Err(Failure::Unreachable(why)) => note(&mut tried, &url, why),
                    Err(Failure::NotLeader(None)) => {
                        followers = true;
                        note(
                            &mut tried,
                            &url,
                            "not the leader; no leader known yet".into(),
                        );
                    }
                    Err(Failure::NotLeader(Some(leader))) => {
                        followers = true;
                        note(
                            &mut tried,
                            &url,
                            format!("not the leader; named {leader} as the leader"),
                        );
                        if leader == url {
                            continue;
                        }
                        hops += 1;
                        if hops > policy.max_hops {
                            // Masters naming each other in a ring: an election under way,
                            // or masters that disagree. Another round may do.
                            note(
                                &mut tried,
                                &url,
                                format!(
                                    "named {leader} as the leader, after {} redirects from {first}; stopped there",
                                    policy.max_hops
                                ),
                            );
                            continue;
                        }
                        next = Some(leader);
                    }
                }
            }
        }
        if !followers {
            return give_up("no master answered as leader or follower".into(), tried);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left <= delay {
            return give_up(
                format!("no leader found within {:?}", policy.deadline),
                tried,
            );
        }
        tokio::time::sleep(jittered(delay)).await;
        delay = (delay * 2).min(policy.retry_max);
    }
}

/// Somewhere from half of `d` to all of it: many clients that lost their master at the same
/// moment do not all ask again at the same moments.
pub fn jittered(d: std::time::Duration) -> std::time::Duration {
    use std::hash::{BuildHasher, Hasher};
    // A randomly keyed hasher's output is a cheap random number.
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    d / 2 + d.mul_f64((r % 1000) as f64 / 2000.0)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What each fake master answers, by URL; every attempt is recorded.
    #[derive(Clone)]
    enum Says {
        Leads,
        Names(&'static str),
        NoLeader,
        Down,
        Refuses,
    }

    async fn search(
        masters: &[&str],
        says: HashMap<&'static str, Says>,
        policy: &DialPolicy,
    ) -> (Result<(String, ()), DialError<String>>, Vec<String>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let list: Vec<String> = masters.iter().map(|m| (*m).to_owned()).collect();
        let result = find_leader(&list, policy, |url: String| {
            let (log, says) = (log.clone(), says.clone());
            async move {
                log.lock().unwrap().push(url.clone());
                match says.get(url.as_str()).cloned().unwrap_or(Says::Down) {
                    Says::Leads => Ok(()),
                    Says::Names(l) => Err(Failure::NotLeader(Some(l.to_owned()))),
                    Says::NoLeader => Err(Failure::NotLeader(None)),
                    Says::Down => Err(Failure::Unreachable("connection refused".into())),
                    Says::Refuses => Err(Failure::Refused(format!("{url} says no"))),
                }
            }
        })
        .await;
        let log = log.lock().unwrap().clone();
        (result, log)
    }

    #[tokio::test]
    async fn a_redirect_is_followed_to_the_leader() {
        let says = HashMap::from([
            ("a", Says::Down),
            ("b", Says::Names("c")),
            ("c", Says::Leads),
        ]);
        let (r, log) = search(&["a", "b"], says, &DialPolicy::default()).await;
        assert_eq!(r.unwrap().0, "c");
        assert_eq!(log, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn a_refusal_stops_the_search() {
        let says = HashMap::from([("a", Says::Refuses), ("b", Says::Leads)]);
        let (r, log) = search(&["a", "b"], says, &DialPolicy::default()).await;
        assert!(matches!(r, Err(DialError::Refused { master, .. }) if master == "a"));
        assert_eq!(log, ["a"]);
    }

    #[tokio::test]
    async fn no_answer_at_all_fails_after_one_round_naming_each_master() {
        let (r, log) = search(&["a", "b"], HashMap::new(), &DialPolicy::default()).await;
        let Err(DialError::NoLeader(e)) = r else {
            panic!("{r:?}")
        };
        assert_eq!(log, ["a", "b"]);
        assert_eq!(
            e.to_string(),
            "no master answered as leader or follower: a: connection refused; b: connection refused"
        );
    }

    /// Small waits, so the test runs in real time.
    fn quick() -> DialPolicy {
        DialPolicy {
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_millis(40),
            attempt_timeout: Duration::from_millis(100),
            deadline: Duration::from_millis(300),
            ..DialPolicy::default()
        }
    }

    #[tokio::test]
    async fn an_election_is_waited_for_until_the_deadline() {
        let says = HashMap::from([("a", Says::NoLeader), ("b", Says::Names("dead"))]);
        let policy = quick();
        let started = Instant::now();
        let (r, log) = search(&["a", "b"], says, &policy).await;
        let Err(DialError::NoLeader(e)) = r else {
            panic!("{r:?}")
        };
        assert!(
            started.elapsed() <= policy.deadline,
            "{:?}",
            started.elapsed()
        );
        // Rounds at about 0, 10, 30, 70, 110, ... ms, each of three attempts.
        assert!(log.len() >= 4 * 3, "{log:?}");
        let text = e.to_string();
        assert!(text.starts_with("no leader found within 300ms: "), "{text}");
        for part in [
            "a: not the leader; no leader known yet",
            "b: not the leader; named dead",
            "dead: connection refused",
        ] {
            assert!(text.contains(part), "{text}");
        }
    }

    #[tokio::test]
    async fn a_leader_elected_during_the_search_is_found() {
        let log = Arc::new(Mutex::new(0u32));
        let list = vec!["a".to_owned()];
        let (url, ()) = find_leader(&list, &quick(), |url| {
            let log = log.clone();
            async move {
                let mut n = log.lock().unwrap();
                *n += 1;
                match *n {
                    1 | 2 => Err(Failure::<String>::NotLeader(None)),
                    3 => Err(Failure::NotLeader(Some("b".into()))),
                    _ if url == "b" => Ok(()),
                    _ => Err(Failure::Unreachable("?".into())),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(url, "b");
    }

    #[tokio::test]
    async fn redirect_loops_are_bounded() {
        let says = HashMap::from([("a", Says::Names("b")), ("b", Says::Names("a"))]);
        let (r, log) = search(&["a"], says, &quick()).await;
        let Err(DialError::NoLeader(e)) = r else {
            panic!("{r:?}")
        };
        // Each round follows eight redirects from `a`, then waits for the next round.
        assert_eq!(
            log[..10],
            ["a", "b", "a", "b", "a", "b", "a", "b", "a", "a"]
        );
        assert!(e.reason.starts_with("no leader found within"), "{e}");
        assert!(e.to_string().contains("after 8 redirects from a"), "{e}");
    }

    #[tokio::test]
    async fn a_master_that_hangs_is_given_up_on() {
        let list = vec!["slow".to_owned(), "b".to_owned()];
        let (url, ()) = find_leader(&list, &quick(), |url| async move {
            if url == "slow" {
                std::future::pending::<()>().await;
            }
            Ok::<_, Failure<String>>(())
        })
        .await
        .unwrap();
        assert_eq!(url, "b");
    }

    #[test]
    fn a_named_leader_goes_first_and_the_lost_master_last() {
        let l = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let abc = l(&["a", "b", "c"]);
        assert_eq!(order(&abc, None, Some("a")), l(&["b", "c", "a"]));
        assert_eq!(order(&abc, Some("c"), Some("a")), l(&["c", "b", "a"]));
        assert_eq!(order(&abc, Some("x"), Some("a")), l(&["x", "b", "c", "a"]));
        assert_eq!(order(&abc, Some("a"), Some("a")), abc);
        assert_eq!(order(&abc, None, Some("x")), abc);
        assert_eq!(order(&abc, None, None), abc);
    }
}
