//! What every Mesos v1 HTTP endpoint does the same way, for the master's and the agent's:
//! error answers as Mesos gives them, the encodings a call chooses (`Content-Type`, then
//! `Accept`), a call's body read within bounds, and an event stream as a RecordIO response.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio_stream::Stream;

use crate::codec::{CodecError, Format};

/// The largest call read. An ACCEPT of thousands of tasks fits.
pub const MAX_CALL_BYTES: usize = 16 << 20;

/// How long a caller may take to send its call's body.
pub const BODY_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// An error answer: `code` with `message` as its text body, as Mesos answers.
pub fn answer(code: StatusCode, message: impl Into<String>) -> Response {
    let mut message = message.into();
    message.push('\n');
    (code, message).into_response()
}

/// A header's value, if it is there and is text.
pub fn header_of(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The encoding of the call (`Content-Type`) and of the answer (`Accept`), or Mesos's
/// refusal: 400 without a content type, 415 for one it does not speak, 406 for an `Accept`
/// it cannot meet.
///
/// # Errors
/// The answer to send instead.
pub fn formats(headers: &HeaderMap) -> Result<(Format, Format), Box<Response>> {
    let input = match Format::of_content_type(header_of(headers, header::CONTENT_TYPE)) {
        Ok(f) => f,
        Err(e @ CodecError::NoContentType) => {
            return Err(Box::new(answer(StatusCode::BAD_REQUEST, e.to_string())));
        }
        Err(e) => {
            return Err(Box::new(answer(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                e.to_string(),
            )));
        }
    };
    let output = Format::of_accept(header_of(headers, header::ACCEPT))
        .map_err(|e| Box::new(answer(StatusCode::NOT_ACCEPTABLE, e.to_string())))?;
    Ok((input, output))
}

/// A call read from its body (at most [`MAX_CALL_BYTES`], arriving within
/// [`BODY_WITHIN`]) and decoded as `format`.
///
/// # Errors
/// 413 for a larger body, 408 for one too slow, 400 naming what is malformed.
pub async fn call<M>(format: Format, body: Body) -> Result<M, Box<Response>>
where
    M: prost::Message + prost::Name + Default,
{
    let bytes =
        match tokio::time::timeout(BODY_WITHIN, axum::body::to_bytes(body, MAX_CALL_BYTES)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                return Err(Box::new(answer(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the call could not be read (at most {MAX_CALL_BYTES} bytes): {e}"),
                )));
            }
            Err(_) => {
                return Err(Box::new(answer(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the call's body did not arrive within {BODY_WITHIN:?}"),
                )));
            }
        };
    crate::codec::decode(format, &bytes)
        .map_err(|e| Box::new(answer(StatusCode::BAD_REQUEST, e.to_string())))
}

/// A `200` whose body is `records`, each already framed: every record goes out as one
/// HTTP chunk, which some Mesos clients rely on (they parse one record per chunk).
pub fn event_stream<S>(output: Format, records: S) -> Response
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    use tokio_stream::StreamExt as _;
    let body = Body::from_stream(records.map(Ok::<Bytes, std::convert::Infallible>));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(output.media_type()),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
