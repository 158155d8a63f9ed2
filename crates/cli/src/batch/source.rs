//! The batch input as a stream of lines: opened once (standard input is first copied to a private
//! temporary file, so that it can be read twice), hashed, decoded from UTF-8 (with or without a BOM)
//! or UTF-16 (LE or BE, with a BOM), and cut into lines of at most `--max-line-bytes` bytes. Only one
//! line is in memory at a time.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use encoding_rs::{Decoder, UTF_16BE, UTF_16LE};
use sha2::{Digest, Sha256};

/// An input that cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read the input {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot keep a copy of standard input in a temporary file: {0}")]
    Spool(#[source] io::Error),
}

/// The text encodings batch input may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Utf8,
    Utf16Le,
    Utf16Be,
}

/// An opened input.
pub struct Source {
    file: File,
    path: PathBuf,
    encoding: Encoding,
    /// Bytes of the byte order mark at the start (skipped when reading).
    bom: u64,
}

impl Source {
    /// Opens `path` (`-`: standard input, copied to a temporary file first).
    pub fn open(path: &Path) -> Result<Source, SourceError> {
        let read_error = |source| SourceError::Read { path: path.to_owned(), source };
        let mut file = if path == Path::new("-") {
            // Deleted at once by tempfile, and created 0600: the input may hold secrets.
            let mut spool = tempfile::tempfile().map_err(SourceError::Spool)?;
            io::copy(&mut io::stdin().lock(), &mut spool).map_err(SourceError::Spool)?;
            spool
        } else {
            File::open(path).map_err(read_error)?
        };
        file.seek(SeekFrom::Start(0)).map_err(read_error)?;
        let mut start = [0u8; 3];
        let mut got = 0;
        while got < start.len() {
            match file.read(&mut start[got..]).map_err(read_error)? {
                0 => break,
                n => got += n,
            }
        }
        let (encoding, bom) = match &start[..got] {
            [0xEF, 0xBB, 0xBF, ..] => (Encoding::Utf8, 3),
            [0xFF, 0xFE, ..] => (Encoding::Utf16Le, 2),
            [0xFE, 0xFF, ..] => (Encoding::Utf16Be, 2),
            _ => (Encoding::Utf8, 0),
        };
        Ok(Source { file, path: path.to_owned(), encoding, bom })
    }

    /// A SHA-256 of the input's bytes, in hex (reads it all, one buffer at a time).
    pub fn sha256(&mut self) -> Result<String, SourceError> {
        let read_error = |source| SourceError::Read { path: self.path.clone(), source };
        self.file.seek(SeekFrom::Start(0)).map_err(read_error)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            match self.file.read(&mut buffer).map_err(read_error)? {
                0 => break,
                n => hasher.update(&buffer[..n]),
            }
        }
        Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Lines that are not blank, for the progress display (a CSV cell spanning lines counts each).
    pub fn count_lines(&mut self, max_bytes: usize) -> Result<usize, SourceError> {
        let mut lines = self.lines(max_bytes)?;
        let mut count = 0;
        while let Some(line) = lines.next_line()? {
            count += usize::from(line.text.as_ref().map_or(true, |t| !t.trim().is_empty()));
        }
        Ok(count)
    }

    /// The input's lines from the start, each at most `max_bytes` long (in UTF-8).
    pub fn lines(&mut self, max_bytes: usize) -> Result<Lines, SourceError> {
        let file = self.file.try_clone().map_err(|source| SourceError::Read { path: self.path.clone(), source })?;
        let mut file = file;
        file.seek(SeekFrom::Start(self.bom)).map_err(|source| SourceError::Read { path: self.path.clone(), source })?;
        let reader: Box<dyn BufRead> = match self.encoding {
            Encoding::Utf8 => Box::new(BufReader::with_capacity(64 * 1024, file)),
            Encoding::Utf16Le => Box::new(BufReader::with_capacity(64 * 1024, Transcode::new(file, UTF_16LE.new_decoder_without_bom_handling()))),
            Encoding::Utf16Be => Box::new(BufReader::with_capacity(64 * 1024, Transcode::new(file, UTF_16BE.new_decoder_without_bom_handling()))),
        };
        Ok(Lines { reader, max_bytes, number: 0, path: self.path.clone() })
    }
}

/// Why a line has no text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineError {
    /// Longer than the limit; `bytes` is its whole length.
    TooLong { bytes: u64, limit: usize },
    /// Not valid UTF-8 (or, in UTF-16 input, not valid UTF-16) from this byte of the line on.
    BadEncoding { at: usize },
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineError::TooLong { bytes, limit } => write!(
                f,
                "the line is {bytes} bytes long, over the limit of {limit} bytes; raise it with --max-line-bytes (for example --max-line-bytes {})",
                suggest(*bytes)
            ),
            LineError::BadEncoding { at } => write!(
                f,
                "invalid text at byte {} of the line; save the file as UTF-8 (or UTF-16 with a byte order mark)",
                at + 1
            ),
        }
    }
}

/// A limit that lets a line of `bytes` through, in whole MiB.
fn suggest(bytes: u64) -> String {
    format!("{}M", bytes.div_ceil(1024 * 1024).max(1))
}

/// One physical line of the input, without its line ending (`\n` or `\r\n`).
#[derive(Debug)]
pub struct Line {
    /// 1-based.
    pub number: usize,
    pub text: Result<String, LineError>,
}

/// The lines of an input.
pub struct Lines {
    reader: Box<dyn BufRead>,
    max_bytes: usize,
    number: usize,
    path: PathBuf,
}

impl Lines {
    /// The next line; `None` at the end.
    pub fn next_line(&mut self) -> Result<Option<Line>, SourceError> {
        let mut bytes = Vec::new();
        let mut total: u64 = 0;
        let mut kept = true;
        let mut last = None;
        let mut any = false;
        loop {
            let available = self.reader.fill_buf().map_err(|source| SourceError::Read { path: self.path.clone(), source })?;
            if available.is_empty() {
                if !any {
                    return Ok(None);
                }
                break;
            }
            any = true;
            let (chunk, used, ended) = match available.iter().position(|b| *b == b'\n') {
                Some(end) => (&available[..end], end + 1, true),
                None => (available, available.len(), false),
            };
            total += chunk.len() as u64;
            last = chunk.last().copied().or(last);
            // + 1: room for the `\r` of a CRLF line exactly at the limit.
            if kept && total <= self.max_bytes as u64 + 1 {
                bytes.extend_from_slice(chunk);
            } else if kept {
                kept = false; // too long: keep counting, stop keeping
                bytes = Vec::new();
            }
            self.reader.consume(used);
            if ended {
                break;
            }
        }
        self.number += 1;
        let length = total - u64::from(last == Some(b'\r'));
        if length > self.max_bytes as u64 {
            return Ok(Some(Line { number: self.number, text: Err(LineError::TooLong { bytes: length, limit: self.max_bytes }) }));
        }
        if last == Some(b'\r') {
            bytes.pop();
        }
        let text = String::from_utf8(bytes).map_err(|e| LineError::BadEncoding { at: e.utf8_error().valid_up_to() });
        Ok(Some(Line { number: self.number, text }))
    }
}

/// Reads UTF-16 as UTF-8. A malformed sequence becomes the byte 0xFF, which is never valid UTF-8, so
/// that the line holding it is reported as badly encoded (and the other lines still read).
struct Transcode<R> {
    inner: R,
    decoder: Decoder,
    input: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    done: bool,
    output: Vec<u8>,
    position: usize,
}

impl<R: Read> Transcode<R> {
    fn new(inner: R, decoder: Decoder) -> Transcode<R> {
        Transcode { inner, decoder, input: vec![0; 32 * 1024], start: 0, end: 0, eof: false, done: false, output: Vec::new(), position: 0 }
    }
}

impl<R: Read> Read for Transcode<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.position < self.output.len() {
                let n = buf.len().min(self.output.len() - self.position);
                buf[..n].copy_from_slice(&self.output[self.position..self.position + n]);
                self.position += n;
                return Ok(n);
            }
            if self.done {
                return Ok(0);
            }
            if self.start == self.end && !self.eof {
                self.start = 0;
                self.end = self.inner.read(&mut self.input)?;
                self.eof = self.end == 0;
            }
            self.output.resize(64 * 1024, 0);
            let (result, read, written) =
                self.decoder.decode_to_utf8_without_replacement(&self.input[self.start..self.end], &mut self.output, self.eof);
            self.start += read;
            self.output.truncate(written);
            self.position = 0;
            match result {
                encoding_rs::DecoderResult::InputEmpty => self.done = self.eof,
                encoding_rs::DecoderResult::OutputFull => {}
                encoding_rs::DecoderResult::Malformed(..) => self.output.push(0xFF),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(bytes: &[u8], max: usize) -> Vec<(usize, Result<String, LineError>)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        std::fs::write(&path, bytes).unwrap();
        let mut source = Source::open(&path).unwrap();
        let mut lines = source.lines(max).unwrap();
        std::iter::from_fn(|| lines.next_line().unwrap()).map(|l| (l.number, l.text)).collect()
    }

    fn utf16(text: &str, big_endian: bool) -> Vec<u8> {
        let mut bytes = if big_endian { vec![0xFE, 0xFF] } else { vec![0xFF, 0xFE] };
        for unit in text.encode_utf16() {
            bytes.extend(if big_endian { unit.to_be_bytes() } else { unit.to_le_bytes() });
        }
        bytes
    }

    #[test]
    fn crlf_lf_bom_and_utf16_read_the_same_lines() {
        let want = vec![(1, Ok("a,b".to_owned())), (2, Ok("".to_owned())), (3, Ok("Zoë,李".to_owned()))];
        assert_eq!(lines_of(b"a,b\r\n\r\nZo\xc3\xab,\xe6\x9d\x8e\r\n", 100), want);
        assert_eq!(lines_of(b"\xEF\xBB\xBFa,b\n\nZo\xc3\xab,\xe6\x9d\x8e", 100), want);
        assert_eq!(lines_of(&utf16("a,b\r\n\r\nZoë,李\r\n", false), 100), want);
        assert_eq!(lines_of(&utf16("a,b\n\nZoë,李", true), 100), want);
    }

    #[test]
    fn bad_bytes_and_long_lines_are_reported_with_their_line() {
        let got = lines_of(b"ok\nbad \xff here\nok again\n", 100);
        assert_eq!(got[1], (2, Err(LineError::BadEncoding { at: 4 })));
        assert_eq!(got[2], (3, Ok("ok again".to_owned())));
        let mut bad16 = utf16("ok\n", false);
        bad16.extend([0x00, 0xD8, b'x', 0x00, b'\n', 0x00]); // a lone high surrogate
        bad16.extend(&utf16("fine\n", false)[2..]);
        let got = lines_of(&bad16, 100);
        assert!(matches!(got[1], (2, Err(LineError::BadEncoding { .. }))), "{got:?}");
        assert_eq!(got[2], (3, Ok("fine".to_owned())));
        let got = lines_of(b"12345\r\n123456\n1234567\r\nend", 6);
        assert_eq!(got[0], (1, Ok("12345".to_owned())));
        assert_eq!(got[1], (2, Ok("123456".to_owned())));
        assert_eq!(got[2], (3, Err(LineError::TooLong { bytes: 7, limit: 6 })));
        assert_eq!(got[3], (4, Ok("end".to_owned())));
        let message = LineError::TooLong { bytes: 3 * 1024 * 1024 + 1, limit: 10 }.to_string();
        assert!(message.contains("--max-line-bytes 4M"), "{message}");
    }
}
