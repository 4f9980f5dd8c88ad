//! How a master that does not lead says who does, and how callers follow it.
//!
//! A follower answers every scheduler, agent and operator call with gRPC `UNAVAILABLE`
//! carrying the leader's address (`host:port`) in the `agora-leader` metadata entry (absent
//! while no leader is known: retry another master, or the same one shortly). HTTP endpoints
//! answer `307 Temporary Redirect` with `Location` on the leader. `--master` takes a list of
//! masters, `a:5050,b:5050,c:5050`; a caller tries them in turn and follows redirects.

/// The metadata key of the leader's address.
pub const LEADER_METADATA: &str = "agora-leader";

/// The metadata key a caller sets to the master it just lost (`host:port`, or a URL): a
/// follower that still names that master waits a few heartbeats to hear from it, rather
/// than send the caller straight back to it.
pub const LOST_METADATA: &str = "agora-lost-leader";

/// The most bytes of a lost master's address a master reads from a caller.
const MAX_LOST_BYTES: usize = 512;

/// Sets on `request` the master its caller just lost, if any ([`LOST_METADATA`]); an
/// address that cannot travel as metadata is left out (the hint is an optimisation only).
pub fn tell_lost<T>(request: &mut tonic::Request<T>, master: Option<&str>) {
    if let Some(Ok(v)) = master.map(|m| host_port(m).parse()) {
        request.metadata_mut().insert(LOST_METADATA, v);
    }
}

/// The master a caller says it just lost ([`tell_lost`]): `None` when absent, empty, not
/// text, or longer than 512 bytes.
pub fn lost(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    let v = metadata.get(LOST_METADATA)?.to_str().ok()?.trim();
    (!v.is_empty() && v.len() <= MAX_LOST_BYTES).then(|| v.to_owned())
}

/// `host:port` of an address given with or without a scheme, for comparing addresses.
pub fn host_port(addr: &str) -> &str {
    let a = addr.trim();
    let a = a.split_once("://").map_or(a, |(_, rest)| rest);
    a.trim_end_matches('/')
}

/// The status a follower answers with.
pub fn not_leader(leader: Option<&str>) -> tonic::Status {
    let msg = match leader {
        Some(l) => format!("this master is not the leader; the leader is {l}"),
        None => "this master is not the leader, and no leader is elected yet; retry shortly".into(),
    };
    let mut status = tonic::Status::unavailable(msg);
    if let Some(l) = leader
        && let Ok(v) = l.parse()
    {
        status.metadata_mut().insert(LEADER_METADATA, v);
    }
    status
}

/// Whether a status says "not the leader", and the leader's address when it names one:
/// `None` for any other status, `Some(None)` for a follower that knows no leader.
pub fn redirect(status: &tonic::Status) -> Option<Option<String>> {
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    match status.metadata().get(LEADER_METADATA) {
        Some(v) => Some(v.to_str().ok().map(|s| with_scheme(s.trim()))),
        None if status
            .message()
            .starts_with("this master is not the leader") =>
        {
            Some(None)
        }
        None => None,
    }
}

/// `host:port` becomes `http://host:port`; an address with a scheme is kept.
pub fn with_scheme(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// The masters of a `--master` list, each with a scheme, in the order given.
///
/// # Errors
/// When the list names no master.
pub fn masters(list: &str) -> Result<Vec<String>, String> {
    let out: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| with_scheme(s).trim_end_matches('/').to_owned())
        .collect();
    if out.is_empty() {
        return Err(format!("no master address in {list:?}"));
    }
    if out.len() > 16 {
        return Err(format!("{} masters given; at most 16", out.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_status_names_the_leader() {
        let s = not_leader(Some("10.0.0.2:5050"));
        assert_eq!(redirect(&s), Some(Some("http://10.0.0.2:5050".into())));
        assert_eq!(redirect(&not_leader(None)), Some(None));
        assert_eq!(redirect(&tonic::Status::unavailable("down")), None);
        assert_eq!(redirect(&tonic::Status::not_found("x")), None);
    }

    #[test]
    fn a_lost_master_travels_in_metadata_and_is_bounded() {
        let mut r = tonic::Request::new(());
        tell_lost(&mut r, Some("http://10.0.0.1:5050/"));
        assert_eq!(lost(r.metadata()).as_deref(), Some("10.0.0.1:5050"));
        assert_eq!(lost(tonic::Request::new(()).metadata()), None);
        let mut long = tonic::Request::new(());
        tell_lost(&mut long, Some(&"a".repeat(MAX_LOST_BYTES + 1)));
        assert_eq!(lost(long.metadata()), None, "too long");
        let mut blank = tonic::Request::new(());
        blank
            .metadata_mut()
            .insert(LOST_METADATA, "  ".parse().unwrap());
        assert_eq!(lost(blank.metadata()), None, "blank");
    }

    #[test]
    fn master_lists_parse() {
        assert_eq!(
            masters("a:1, b:2,http://c:3/").unwrap(),
            vec!["http://a:1", "http://b:2", "http://c:3"]
        );
        assert!(masters(" , ").is_err());
    }
}
