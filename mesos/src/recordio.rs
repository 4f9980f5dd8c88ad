//! RecordIO, the framing of Mesos's event streams: each record is its length in bytes as
//! decimal ASCII, a line feed, then the record. Records are independent of the HTTP chunks
//! that carry them: a reader must join and split them itself.

use bytes::{Buf, Bytes, BytesMut};

/// `record` framed: its length, `\n`, itself.
pub fn frame(record: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(record.len() + 21);
    out.extend_from_slice(record.len().to_string().as_bytes());
    out.extend_from_slice(b"\n");
    out.extend_from_slice(record);
    out.freeze()
}

/// Why a stream is not RecordIO.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordIoError {
    #[error("a record's length is not a decimal number: {0:?}")]
    BadLength(String),
    #[error("a record of {size} bytes is longer than the {max} bytes allowed")]
    TooLong { size: u64, max: usize },
    #[error("a record's length is zero")]
    Empty,
}

/// Reads records out of a byte stream that arrives in arbitrary pieces.
#[derive(Debug)]
pub struct Reader {
    buffer: BytesMut,
    max: usize,
}

/// The longest length prefix read: 20 digits hold any u64.
const MAX_DIGITS: usize = 20;

impl Reader {
    /// A reader that refuses records longer than `max` bytes.
    pub fn new(max: usize) -> Reader {
        Reader {
            buffer: BytesMut::new(),
            max,
        }
    }

    /// Adds the next piece of the stream.
    pub fn push(&mut self, piece: &[u8]) {
        self.buffer.extend_from_slice(piece);
    }

    /// The next whole record, if one has arrived.
    ///
    /// # Errors
    /// When the stream is not RecordIO (after which it cannot be read on).
    pub fn next_record(&mut self) -> Result<Option<Bytes>, RecordIoError> {
        let Some(newline) = self
            .buffer
            .iter()
            .take(MAX_DIGITS + 1)
            .position(|&b| b == b'\n')
        else {
            if self.buffer.len() > MAX_DIGITS {
                let head = String::from_utf8_lossy(&self.buffer[..MAX_DIGITS]).into_owned();
                return Err(RecordIoError::BadLength(head));
            }
            return Ok(None);
        };
        let digits = &self.buffer[..newline];
        let text = std::str::from_utf8(digits).unwrap_or_default();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RecordIoError::BadLength(
                String::from_utf8_lossy(digits).into_owned(),
            ));
        }
        let size: u64 = text
            .parse()
            .map_err(|_| RecordIoError::BadLength(text.to_owned()))?;
        if size == 0 {
            return Err(RecordIoError::Empty);
        }
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l <= self.max)
            .ok_or(RecordIoError::TooLong {
                size,
                max: self.max,
            })?;
        if self.buffer.len() < newline + 1 + len {
            return Ok(None);
        }
        self.buffer.advance(newline + 1);
        Ok(Some(self.buffer.split_to(len).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_record_is_its_length_a_newline_and_itself() {
        assert_eq!(&frame(b"hello")[..], b"5\nhello");
    }

    #[test]
    fn what_is_not_recordio_is_refused() {
        for (input, want) in [
            (&b"x\nabc"[..], RecordIoError::BadLength("x".into())),
            (b"0\n", RecordIoError::Empty),
            (
                b"99999\n",
                RecordIoError::TooLong {
                    size: 99999,
                    max: 100,
                },
            ),
            (
                b"123456789012345678901234",
                RecordIoError::BadLength("12345678901234567890".into()),
            ),
        ] {
            let mut r = Reader::new(100);
            r.push(input);
            assert_eq!(r.next_record(), Err(want), "{input:?}");
        }
    }

    proptest! {
        /// However the stream is cut into pieces, the records read are the records framed.
        #[test]
        fn records_survive_any_split(
            records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..200), 0..20),
            cuts in proptest::collection::vec(1usize..50, 0..40),
        ) {
            let stream: Vec<u8> = records.iter().flat_map(|r| frame(r).to_vec()).collect();
            let mut reader = Reader::new(1000);
            let mut read = Vec::new();
            let mut at = 0;
            let mut cuts = cuts.into_iter();
            while at < stream.len() {
                let n = cuts.next().unwrap_or(stream.len()).min(stream.len() - at);
                reader.push(&stream[at..at + n]);
                at += n;
                while let Some(r) = reader.next_record().unwrap() {
                    read.push(r.to_vec());
                }
            }
            prop_assert_eq!(read, records);
        }
    }
}
