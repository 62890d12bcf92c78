//! The parent's control socket protocol: one JSON object per line each way,
//! a request from the client, then its response. Plain data structs; every
//! line that is not a request this parent knows is an error response, never
//! a dropped connection without a word. [`ask`] is the client's side
//! (`umdevctl`, the scheduler benchmark).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The longest request line accepted (longer ones are refused, their rest
/// skipped up to the next newline).
pub const MAX_REQUEST: usize = 4096;

/// The error a parent answers when it is serving as many control clients as
/// it will at once; a client may try again (umdevctl does, for a while).
pub const BUSY: &str = "the parent is serving too many control clients; try again";

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The types and how many more of each fit.
    Types {},
    /// A new instance (`uuid` made up when absent); `persist` also writes its
    /// definition to the config file.
    Create {
        #[serde(rename = "type")]
        type_name: String,
        #[serde(default)]
        uuid: Option<String>,
        #[serde(default)]
        weight: Option<u32>,
        #[serde(default)]
        persist: bool,
    },
    List {},
    /// Removes an instance; refused while a VMM is attached unless `force`
    /// (which resets the device and disconnects the VMM).
    Remove {
        uuid: String,
        #[serde(default)]
        force: bool,
    },
    SetWeight {
        uuid: String,
        weight: u32,
    },
}

/// What a `types` response lists per type.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct TypeInfo {
    pub name: String,
    pub vram_mib: u32,
    pub contexts: u32,
    pub ggtt_entries: u32,
    pub available: u64,
    pub description: String,
}

/// What `create` and `list` say of an instance.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct InstanceInfo {
    pub uuid: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub socket: String,
    pub weight: u32,
    pub persistent: bool,
    /// A VMM is connected now.
    pub attached: bool,
    /// Engine time used so far, in seconds.
    pub engine_seconds: f64,
    /// Serving on its socket. False for a persistent definition the parent
    /// could not make at start, or an instance whose server failed; `problem`
    /// says why.
    pub active: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Where its VNC server listens (`ADDR:PORT` or `unix:PATH`), on a parent
    /// started with `--vnc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Types { types: Vec<TypeInfo> },
    Instance { instance: InstanceInfo },
    List { instances: Vec<InstanceInfo> },
    Done,
    Error { error: String },
}

impl Response {
    pub fn error(e: impl std::fmt::Display) -> Response {
        Response::Error {
            error: e.to_string(),
        }
    }

    /// The response as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"error":{"error":"the response could not be encoded"}}"#.to_vec()
        });
        v.push(b'\n');
        v
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    #[error("not a request: {0}")]
    Malformed(String),
}

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() > MAX_REQUEST {
        return Err(RequestError::TooLong);
    }
    serde_json::from_slice(line).map_err(|e| RequestError::Malformed(e.to_string()))
}

/// A UUID in its canonical text form (8-4-4-4-12 hex digits), lower-cased.
pub fn canonical_uuid(s: &str) -> Option<String> {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| s.to_ascii_lowercase())
}

/// A random (version 4) UUID.
pub fn new_uuid() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom(2) writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy call: time and pid still make it unique on this host.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b[..16].copy_from_slice(&(t ^ (u128::from(std::process::id()) << 64)).to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// How long a busy parent (serving its most control clients) is retried by
/// [`ask_patiently`].
pub const BUSY_RETRY: Duration = Duration::from_secs(15);

/// Why [`ask`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the parent at {path}: {source}")]
    Connect {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: the parent closed without answering")]
    NoAnswer { path: std::path::PathBuf },
    #[error("the parent's answer {answer:?}: {source}")]
    Answer {
        answer: String,
        source: serde_json::Error,
    },
    #[error("the request cannot be encoded: {0}")]
    Encode(serde_json::Error),
}

/// Sends one request to the parent's control socket at `path` and reads its
/// answer (an error answer is an `Ok` [`Response::Error`]).
pub fn ask(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut line = serde_json::to_vec(request).map_err(ControlError::Encode)?;
    line.push(b'\n');
    // A parent that turns the client away (busy) answers and closes without
    // reading: the answer is still there to read after a failed write.
    let sent = s.write_all(&line);
    let mut answer = String::new();
    let read = BufReader::new(s).read_line(&mut answer);
    match (sent, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) | (Ok(()), Err(e)) => return Err(io(e)),
        (Ok(()), Ok(_)) => {
            return Err(ControlError::NoAnswer {
                path: path.to_owned(),
            })
        }
    }
    serde_json::from_str(&answer).map_err(|source| ControlError::Answer { answer, source })
}

/// [`ask`], again while the parent answers [`BUSY`] (for [`BUSY_RETRY`]).
pub fn ask_patiently(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let deadline = Instant::now() + BUSY_RETRY;
    loop {
        match ask(path, request)? {
            Response::Error { error } if error == BUSY && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return Ok(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_garbage_is_an_error() {
        assert_eq!(parse_request(br#"{"cmd":"types"}"#), Ok(Request::Types {}));
        assert_eq!(
            parse_request(br#"{"cmd":"create","type":"vgpu-16m","weight":3}"#),
            Ok(Request::Create {
                type_name: "vgpu-16m".into(),
                uuid: None,
                weight: Some(3),
                persist: false
            })
        );
        for bad in [
            &b"{"[..],
            b"",
            b"[]",
            br#"{"cmd":"explode"}"#,
            br#"{"cmd":"remove"}"#,
            br#"{"cmd":"types","extra":1}"#,
            br#"{"cmd":"set-weight","uuid":"x","weight":-1}"#,
            b"\xff\xfe",
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_request(&vec![b' '; MAX_REQUEST + 1]),
            Err(RequestError::TooLong)
        );
    }

    #[test]
    fn uuids() {
        let u = new_uuid();
        assert_eq!(canonical_uuid(&u), Some(u.clone()));
        assert_eq!(u.as_bytes()[14], b'4');
        assert_eq!(
            canonical_uuid("A0B1C2D3-0000-4000-8000-00000000000F").as_deref(),
            Some("a0b1c2d3-0000-4000-8000-00000000000f")
        );
        for bad in [
            "",
            "x",
            "a0b1c2d3-0000-4000-8000-00000000000",
            "../../etc-passwd-aaaa-bbbb-cccc",
        ] {
            assert_eq!(canonical_uuid(bad), None, "{bad}");
        }
    }
}
