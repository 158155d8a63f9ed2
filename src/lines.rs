//! A bounded line codec that survives an over-long line.
//!
//! tokio-util's `LinesCodec` reports a line over its limit as an error, and `FramedRead` ends the
//! stream after any decoder error. An over-long line must not end the reading of a worker's stdout or
//! stderr (the worker would then block on a full pipe), so here it is an item of its own and reading
//! goes on with the next line.

use bytes::BytesMut;
use tokio::io::AsyncRead;
use tokio_util::codec::{Decoder, FramedRead, LinesCodec, LinesCodecError};

/// One item read from a bounded line stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// A complete line, without its newline.
    Text(String),
    /// A line longer than the limit; it was skipped.
    TooLong,
}

pub(crate) struct BoundedLines(LinesCodec);

impl Decoder for BoundedLines {
    type Item = Line;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, std::io::Error> {
        convert(self.0.decode(buf))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Line>, std::io::Error> {
        convert(self.0.decode_eof(buf))
    }
}

fn convert(decoded: Result<Option<String>, LinesCodecError>) -> Result<Option<Line>, std::io::Error> {
    match decoded {
        Ok(line) => Ok(line.map(Line::Text)),
        // The codec now skips to the next newline by itself.
        Err(LinesCodecError::MaxLineLengthExceeded) => Ok(Some(Line::TooLong)),
        Err(LinesCodecError::Io(error)) => Err(error),
    }
}

/// Reads `source` line by line, each line at most `max_length` bytes.
pub(crate) fn bounded_lines<R: AsyncRead>(source: R, max_length: usize) -> FramedRead<R, BoundedLines> {
    FramedRead::new(source, BoundedLines(LinesCodec::new_with_max_length(max_length)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn an_over_long_line_is_reported_and_reading_goes_on() {
        let input: &[u8] = b"short\nthis line is far too long\nafter\n";
        let lines: Vec<Line> = bounded_lines(input, 10).map(|l| l.unwrap()).collect().await;
        assert_eq!(lines, [Line::Text("short".into()), Line::TooLong, Line::Text("after".into())]);
    }
}
