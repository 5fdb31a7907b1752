//! A small Hugging Face hub on 127.0.0.1 for download tests: the routes and headers
//! `huggingface_hub` relies on, and the ways a real hub fails.
//!
//! - `GET /api/models/{repo}/revision/{rev}` -> `{"sha", "siblings": [{"rfilename"}]}`
//! - `HEAD|GET /{repo}/resolve/{rev}/{file}`: a git file answers 200 with `ETag` (its git blob
//!   sha1), `X-Repo-Commit`, `Content-Length`; an LFS file answers 302 to `/cdn/{sha256}` with
//!   `X-Linked-Etag` (sha256), `X-Linked-Size`, `X-Repo-Commit`.
//! - `GET /cdn/{sha256}`: the bytes, with `Range: bytes=N-` support (206).
//! - Failures: 404 (`X-Error-Code` RepoNotFound / RevisionNotFound / EntryNotFound), 401 for a
//!   gated repo without `Authorization: Bearer <token>`, a connection dropped mid-file, a
//!   corrupted body.
//!
//! One request per connection (`Connection: close`); every request is logged.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha1::Digest;

#[derive(Clone)]
pub struct HubFile {
    pub name: String,
    pub bytes: Vec<u8>,
    pub lfs: bool,
}

impl HubFile {
    pub fn git(name: &str, bytes: &[u8]) -> Self {
        Self {
            name: name.into(),
            bytes: bytes.to_vec(),
            lfs: false,
        }
    }

    pub fn lfs(name: &str, bytes: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            bytes,
            lfs: true,
        }
    }

    /// The etag the hub gives: sha256 for LFS files, the git blob sha1 otherwise.
    pub fn etag(&self) -> String {
        if self.lfs {
            sha256_hex(&self.bytes)
        } else {
            git_sha1_hex(&self.bytes)
        }
    }
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex(&sha2::Sha256::digest(b))
}

pub fn git_sha1_hex(b: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    hex(&h.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes that are not all alike, so a wrong offset shows.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2654435761) >> 13) as u8 ^ seed)
        .collect()
}

#[derive(Clone)]
pub struct Repo {
    pub commit: String,
    pub files: Vec<HubFile>,
    /// Answers 401 on resolve without the right token.
    pub gated_token: Option<String>,
    /// Serves the file-list API (else 404 there, and clients must probe).
    pub api: bool,
    /// The API takes `main` and full commits only (a short commit: 404 RevisionNotFound).
    pub api_full_revisions_only: bool,
}

impl Repo {
    pub fn new(commit: &str, files: Vec<HubFile>) -> Self {
        Self {
            commit: commit.into(),
            files,
            gated_token: None,
            api: true,
            api_full_revisions_only: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
pub struct State {
    pub repos: HashMap<String, Repo>,
    pub log: Vec<Request>,
    /// CDN bodies to cut off after half their bytes, this many more times.
    pub drops_left: u32,
    /// Serve LFS bodies with one byte flipped.
    pub corrupt: bool,
    /// Renamed repos: old id -> new id (answered with a relative 307, as the hub does).
    pub renamed: HashMap<String, String>,
}

pub struct FakeHub {
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

impl FakeHub {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let (s, base) = (state.clone(), url.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (s, base) = (s.clone(), base.clone());
                std::thread::spawn(move || handle(stream, &s, &base));
            }
        });
        Self { url, state }
    }

    pub fn add(&self, id: &str, repo: Repo) {
        self.state.lock().unwrap().repos.insert(id.into(), repo);
    }

    pub fn log(&self) -> Vec<Request> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().log.len()
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn rev_matches(rev: &str, commit: &str) -> bool {
    rev == "main" || rev == commit || (rev.len() >= 7 && commit.starts_with(rev))
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then close.
    cut_at: Option<usize>,
}

fn reply(status: u16, headers: &[(&str, String)], body: Vec<u8>) -> Reply {
    Reply {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        body,
        cut_at: None,
    }
}

fn error(status: u16, code: &str) -> Reply {
    reply(
        status,
        &[
            ("X-Error-Code", code.to_string()),
            ("X-Error-Message", format!("{code} (fake hub)")),
        ],
        format!("{{\"error\":\"{code}\"}}").into_bytes(),
    )
}

fn handle(stream: TcpStream, state: &Mutex<State>, base: &str) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let req = Request {
        method,
        path,
        headers,
    };
    let r = {
        let mut st = state.lock().unwrap();
        st.log.push(req.clone());
        route(&req, &mut st, base)
    };
    send(stream, &req, r);
}

fn route(req: &Request, st: &mut State, base: &str) -> Reply {
    if let Some(rest) = req.path.strip_prefix("/api/models/") {
        let Some((id, rev)) = rest.split_once("/revision/") else {
            return error(404, "RepoNotFound");
        };
        if let Some(new) = st.renamed.get(id) {
            return moved(&format!("/api/models/{new}/revision/{rev}"));
        }
        let Some(repo) = st.repos.get(id) else {
            return error(404, "RepoNotFound");
        };
        if !repo.api {
            return reply(404, &[], b"Not Found".to_vec());
        }
        let rev = decode(rev);
        let short = rev != "main" && rev != repo.commit;
        if !rev_matches(&rev, &repo.commit) || (short && repo.api_full_revisions_only) {
            return error(404, "RevisionNotFound");
        }
        let siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|f| serde_json::json!({ "rfilename": f.name }))
            .collect();
        let body = serde_json::json!({"id": id, "sha": repo.commit, "siblings": siblings});
        return reply(
            200,
            &[("Content-Type", "application/json".into())],
            body.to_string().into_bytes(),
        );
    }
    if let Some(sha) = req.path.strip_prefix("/cdn/") {
        let file = st
            .repos
            .values()
            .flat_map(|r| r.files.iter())
            .find(|f| f.lfs && sha256_hex(&f.bytes) == sha)
            .cloned();
        let Some(file) = file else {
            return reply(404, &[], Vec::new());
        };
        let mut bytes = file.bytes.clone();
        if st.corrupt {
            bytes[0] ^= 0xff;
        }
        let mut r = ranged(req, bytes, &[]);
        if st.drops_left > 0 && r.body.len() > 1 {
            st.drops_left -= 1;
            r.cut_at = Some(r.body.len() / 2);
        }
        return r;
    }
    let Some((id, rest)) = req.path[1..].split_once("/resolve/") else {
        return error(404, "RepoNotFound");
    };
    if let Some(new) = st.renamed.get(id) {
        return moved(&format!("/{new}/resolve/{rest}"));
    }
    let Some(repo) = st.repos.get(id) else {
        return error(404, "RepoNotFound");
    };
    if let Some(tok) = &repo.gated_token {
        if req.header("Authorization") != Some(&format!("Bearer {tok}")) {
            return error(401, "GatedRepo");
        }
    }
    let Some((rev, file)) = rest.split_once('/') else {
        return error(404, "EntryNotFound");
    };
    if !rev_matches(&decode(rev), &repo.commit) {
        return error(404, "RevisionNotFound");
    }
    let name = decode(file);
    let Some(f) = repo.files.iter().find(|f| f.name == name) else {
        return error(404, "EntryNotFound");
    };
    let commit = ("X-Repo-Commit", repo.commit.clone());
    if f.lfs {
        let sha = sha256_hex(&f.bytes);
        reply(
            302,
            &[
                ("Location", format!("{base}/cdn/{sha}")),
                ("ETag", format!("\"{sha}\"")),
                ("X-Linked-Etag", format!("\"{sha}\"")),
                ("X-Linked-Size", f.bytes.len().to_string()),
                commit,
            ],
            b"Found. Redirecting".to_vec(),
        )
    } else {
        let etag = ("ETag", format!("\"{}\"", git_sha1_hex(&f.bytes)));
        ranged(req, f.bytes.clone(), &[etag, commit])
    }
}

/// A renamed repo's answer: no metadata, a relative Location.
fn moved(to: &str) -> Reply {
    reply(307, &[("Location", to.to_string())], b"Moved".to_vec())
}

/// 200 with the whole body, or 206 from the `Range: bytes=N-` offset.
fn ranged(req: &Request, bytes: Vec<u8>, extra: &[(&str, String)]) -> Reply {
    let start = req
        .header("Range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
    match start {
        Some(s) if s < bytes.len() => {
            let mut h = extra.to_vec();
            h.push((
                "Content-Range",
                format!("bytes {s}-{}/{}", bytes.len() - 1, bytes.len()),
            ));
            reply(206, &h, bytes[s..].to_vec())
        }
        Some(_) => reply(416, &[], Vec::new()),
        None => reply(200, extra, bytes),
    }
}

fn send(mut stream: TcpStream, req: &Request, r: Reply) {
    let reason = match r.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Whatever",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", r.status);
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        r.body.len()
    ));
    let _ = stream.write_all(head.as_bytes());
    if req.method != "HEAD" {
        let n = r.cut_at.unwrap_or(r.body.len());
        let _ = stream.write_all(&r.body[..n]);
    }
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

/// A fresh, empty folder (a cache for one test), removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ff-hub-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
