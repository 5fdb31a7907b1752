//! Fetching a model repo from the hub into the cache, laid out as `huggingface_hub` lays it out.
//!
//! The steps are `huggingface_hub`'s: ask `/api/models/{repo}/revision/{rev}` for the commit and
//! the file list (a server without that route is probed file by file, 404 meaning absent); for
//! each needed file HEAD `/{repo}/resolve/{commit}/{file}` without following redirects to read
//! `X-Repo-Commit`, the etag (`X-Linked-Etag` for LFS files: their sha256) and the size; GET the
//! file (an LFS file from the CDN the hub redirects to) into `blobs/<etag>.incomplete`, resuming
//! with `Range` after a dropped connection; check it against the etag and rename it to
//! `blobs/<etag>`. Only when every blob is in place do the `snapshots/<commit>/<file>` symlinks and
//! `refs/<revision>` appear, so an interrupted download never looks like a cached model (its
//! `.incomplete` blobs stay, to be resumed).

use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sha1::Digest;

use super::{cached_snapshot, is_hub_id, repo_folder_name, token_path, HubOptions};
use crate::error::{Error, Result};

/// Config and tokenizer files a pipeline may read, fetched when the repo has them.
const TOP_LEVEL: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "source.spm",
    "target.spm",
    "chat_template.jinja",
    "chat_template.json",
    // sentence-transformers
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    // speech: Whisper's and wav2vec2's feature extractors (wav2vec2's vocab.json is above),
    // faster-whisper's vocabulary
    "preprocessor_config.json",
    "vocabulary.txt",
    "vocabulary.json",
];

/// Weights, best first: the first one the repo has is fetched (an index brings its shards).
const WEIGHTS: &[&str] = &[
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    // CTranslate2 (faster-whisper repos)
    "model.bin",
];

/// Attempts at one file's body before giving up (each resumes where the last one stopped).
const MAX_ATTEMPTS: u32 = 5;

/// The files of a repo (its `siblings`) that a pipeline needs: config and tokenizer files, one
/// kind of weights (safetensors before `.bin`; a lone GGUF file when there is nothing else), and
/// the sentence-transformers module folders (`1_Pooling/config.json`, ...) when `modules.json` is
/// there. Shards of a sharded checkpoint come later, from its index.
pub fn select_files(siblings: &[String]) -> Vec<String> {
    let has = |f: &str| siblings.iter().any(|s| s == f);
    let mut out: Vec<String> = TOP_LEVEL
        .iter()
        .filter(|f| has(f))
        .map(|f| f.to_string())
        .collect();
    let ggufs: Vec<&String> = siblings
        .iter()
        .filter(|s| !s.contains('/') && s.ends_with(".gguf"))
        .collect();
    if let Some(w) = WEIGHTS.iter().find(|f| has(f)) {
        out.push(w.to_string());
    } else if ggufs.len() == 1 {
        out.push(ggufs[0].clone());
    }
    if has("modules.json") {
        for s in siblings {
            let Some((folder, _)) = s.split_once('/') else {
                continue;
            };
            if !is_module_folder(folder) {
                continue;
            }
            let folder_has_safetensors = siblings
                .iter()
                .any(|o| o.starts_with(&format!("{folder}/")) && o.ends_with(".safetensors"));
            if s.ends_with(".bin") && folder_has_safetensors {
                continue;
            }
            out.push(s.clone());
        }
    }
    out
}

/// `1_Pooling`, `2_Normalize`, `2_Dense`: the folders sentence-transformers writes its modules to.
fn is_module_folder(name: &str) -> bool {
    match name.split_once('_') {
        Some((n, rest)) => {
            !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && !rest.is_empty()
        }
        None => false,
    }
}

/// Download `model` at `revision` (default `main`) into the cache and return its snapshot
/// folder. `files`: exactly these files; `None`: the ones [`select_files`] picks. Files whose
/// blob is already cached are not fetched again. Offline, the cached snapshot or a clear error.
pub fn download(
    model: &str,
    revision: Option<&str>,
    files: Option<&[String]>,
    hub: &HubOptions,
) -> Result<PathBuf> {
    let rev = revision.unwrap_or("main");
    if !is_hub_id(model) {
        return Err(Error::ModelNotFound {
            model: model.to_string(),
            looked_for: format!("a hub id (`org/name`); `{model}` is not one"),
        });
    }
    if !safe_rel(rev) {
        return Err(Error::param(
            "revision",
            format!("`{rev}` is not a valid revision"),
        ));
    }
    if hub.offline {
        return cached_snapshot(model, rev, &hub.cache_dir).ok_or_else(|| {
            not_found(
                model,
                rev,
                hub,
                "the hub was not asked because HF_HUB_OFFLINE is set: unset it to download the \
                 model, or",
            )
        });
    }
    let client = Client::new(hub, model);
    client.run(rev, files).map_err(|f| client.error(rev, f))
}

/// The "not in the cache and not fetched" error: which model, where it looked, what to do.
fn not_found(model: &str, rev: &str, hub: &HubOptions, why_and_what: &str) -> Error {
    let repo = hub.cache_dir.join(repo_folder_name(model));
    Error::ModelNotFound {
        model: model.to_string(),
        looked_for: format!(
            "revision `{rev}` in the hub cache (`{}`: not there); {why_and_what} put the model in \
             the cache (`ferroformers download {model}` on a machine that reaches the hub, \
             scripts/fetch-models.sh, or Python's huggingface_hub with the same HF_HUB_CACHE), \
             or pass a local folder",
            repo.join("snapshots").display()
        ),
    }
}

/// Why a download step failed, before it is turned into an [`Error`] naming the model.
#[derive(Debug)]
enum Fail {
    /// No connection to the hub at all.
    Unreachable(String),
    /// The hub answered with an error status.
    Status {
        status: u16,
        code: Option<String>,
        message: Option<String>,
        url: String,
    },
    /// An answer we cannot use, a checksum mismatch, a download that would not finish.
    Other(String),
    /// A local file system error.
    Local(Error),
}

impl Fail {
    fn is_absent_file(&self) -> bool {
        matches!(self, Fail::Status { status: 404, code, .. }
            if code.as_deref().is_none_or(|c| c == "EntryNotFound"))
    }
}

fn local(path: &Path, e: std::io::Error) -> Fail {
    Fail::Local(Error::io(path, e))
}

fn status_fail(status: u16, resp: &ureq::Response, url: &str) -> Fail {
    Fail::Status {
        status,
        code: resp.header("X-Error-Code").map(str::to_string),
        message: resp.header("X-Error-Message").map(str::to_string),
        url: url.to_string(),
    }
}

fn call_fail(e: ureq::Error, url: &str) -> Fail {
    match e {
        ureq::Error::Status(code, resp) => status_fail(code, &resp, url),
        ureq::Error::Transport(t) => Fail::Unreachable(t.to_string()),
    }
}

/// What a HEAD on a file's resolve URL tells.
#[derive(Debug)]
struct Meta {
    commit: String,
    etag: String,
    size: Option<u64>,
    /// Where to GET it: the resolve URL, or the CDN URL the hub redirected to.
    url: String,
}

/// Something to fetch.
enum Want {
    /// Must exist.
    Required(String),
    /// Fetched when present (404 = absent).
    Optional(String),
    /// The first of these that is present.
    FirstOf(Vec<String>),
}

struct Client<'a> {
    hub: &'a HubOptions,
    model: &'a str,
    /// Redirects off: a HEAD must see the hub's own answer (commit, etag) and not the CDN's.
    head_agent: ureq::Agent,
    /// Redirects on (the CDN may redirect again), auth only to the same host.
    get_agent: ureq::Agent,
}

impl<'a> Client<'a> {
    fn new(hub: &'a HubOptions, model: &'a str) -> Self {
        let ua = format!("ferroformers/{}; rust", env!("CARGO_PKG_VERSION"));
        let base = || {
            ureq::AgentBuilder::new()
                .user_agent(&ua)
                .timeout_connect(Duration::from_secs(10))
                .timeout_read(Duration::from_secs(60))
                .try_proxy_from_env(use_env_proxy(&hub.endpoint))
        };
        Self {
            hub,
            model,
            head_agent: base().redirects(0).build(),
            get_agent: base()
                .redirects(5)
                .redirect_auth_headers(ureq::RedirectAuthHeaders::SameHost)
                .build(),
        }
    }

    /// Add the token, but only for the hub itself (not a CDN on another host).
    fn auth(&self, req: ureq::Request, url: &str) -> ureq::Request {
        match &self.hub.token {
            Some(t) if origin(url) == origin(&self.hub.endpoint) => {
                req.set("Authorization", &format!("Bearer {t}"))
            }
            _ => req,
        }
    }

    fn run(&self, rev: &str, files: Option<&[String]>) -> Result<PathBuf, Fail> {
        let repo_dir = self.hub.cache_dir.join(repo_folder_name(self.model));
        let (mut commit, siblings) = match self.repo_info(rev)? {
            Some((c, s)) => (Some(c), Some(s)),
            None => (None, None),
        };
        let mut queue = VecDeque::new();
        match (files, &siblings) {
            (Some(fs), _) => {
                for f in fs {
                    if let Some(s) = &siblings {
                        if !s.contains(f) {
                            return Err(Fail::Status {
                                status: 404,
                                code: Some("EntryNotFound".into()),
                                message: Some(format!("no file `{f}` at revision `{rev}`")),
                                url: self.resolve_url(rev, f),
                            });
                        }
                    }
                    queue.push_back(Want::Required(f.clone()));
                }
            }
            (None, Some(s)) => {
                let selected = select_files(s);
                let has_weights = selected
                    .iter()
                    .any(|f| WEIGHTS.contains(&f.as_str()) || f.ends_with(".gguf"));
                let ggufs: Vec<&str> = s
                    .iter()
                    .filter(|f| f.ends_with(".gguf"))
                    .map(String::as_str)
                    .collect();
                if !has_weights && ggufs.len() > 1 {
                    return Err(Fail::Other(format!(
                        "the repo has several GGUF files ({}); pick one with `ferroformers \
                         download {} --file NAME`",
                        ggufs.join(", "),
                        self.model
                    )));
                }
                queue.extend(selected.into_iter().map(Want::Required));
            }
            (None, None) => {
                queue.extend(TOP_LEVEL.iter().map(|f| Want::Optional(f.to_string())));
                queue.push_back(Want::FirstOf(
                    WEIGHTS.iter().map(|f| f.to_string()).collect(),
                ));
            }
        }

        let mut seen = BTreeSet::new();
        let mut fetched: Vec<(String, String)> = Vec::new();
        while let Some(want) = queue.pop_front() {
            let at = commit.clone().unwrap_or_else(|| rev.to_string());
            let candidates = match want {
                Want::Required(f) => vec![(f, true)],
                Want::Optional(f) => vec![(f, false)],
                Want::FirstOf(fs) => fs.into_iter().map(|f| (f, false)).collect(),
            };
            let mut found = None;
            for (name, required) in candidates {
                if !safe_rel(&name) {
                    return Err(Fail::Other(format!("refusing the file name `{name}`")));
                }
                if seen.contains(&name) {
                    found = None;
                    break;
                }
                match self.head(&at, &name) {
                    Ok(meta) => {
                        found = Some((name, meta));
                        break;
                    }
                    Err(e) if !required && e.is_absent_file() => continue,
                    Err(e) => return Err(e),
                }
            }
            let Some((name, meta)) = found else {
                continue;
            };
            seen.insert(name.clone());
            match &commit {
                None => commit = Some(meta.commit.clone()),
                Some(c) if *c != meta.commit => {
                    return Err(Fail::Other(format!(
                        "the hub answered commit {} for `{name}` but {c} for the repo",
                        meta.commit
                    )))
                }
                Some(_) => {}
            }
            let blob = self.ensure_blob(&repo_dir, &name, &meta)?;
            if name.ends_with(".index.json") {
                let folder = name.rsplit_once('/').map(|(d, _)| format!("{d}/"));
                for shard in shards_of(&blob)? {
                    let shard = format!("{}{shard}", folder.as_deref().unwrap_or(""));
                    queue.push_back(Want::Required(shard));
                }
            }
            if siblings.is_none() && name == "modules.json" {
                for folder in module_folders(&blob)? {
                    queue.push_back(Want::Optional(format!("{folder}/config.json")));
                    queue.push_back(Want::FirstOf(vec![
                        format!("{folder}/model.safetensors"),
                        format!("{folder}/pytorch_model.bin"),
                    ]));
                }
            }
            fetched.push((name, meta.etag));
        }
        let commit = match commit {
            Some(c) if !fetched.is_empty() => c,
            _ => {
                return Err(Fail::Other(format!(
                    "revision `{rev}` has none of the files a pipeline reads (config.json, \
                     tokenizer files, weights)"
                )))
            }
        };
        let snapshot = link_snapshot(&repo_dir, &commit, &fetched)?;
        if rev != commit {
            write_ref(&repo_dir, rev, &commit)?;
        }
        Ok(snapshot)
    }

    fn resolve_url(&self, rev: &str, file: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            self.hub.endpoint,
            self.model,
            encode(rev, false),
            encode(file, true)
        )
    }

    /// The commit and file list, or `None` when the server has no such API (probe instead).
    fn repo_info(&self, rev: &str) -> Result<Option<(String, Vec<String>)>, Fail> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.hub.endpoint,
            self.model,
            encode(rev, false)
        );
        let resp = match self.auth(self.get_agent.get(&url), &url).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(404 | 405 | 501, r)) if r.header("X-Error-Code").is_none() => {
                return Ok(None)
            }
            // HF pins task defaults by short commit (`714eb0f`), which the resolve route takes;
            // should the API not, probe the files at that revision instead.
            Err(ureq::Error::Status(404, r))
                if super::is_short_hash(rev)
                    && r.header("X-Error-Code") == Some("RevisionNotFound") =>
            {
                return Ok(None)
            }
            Err(e) => return Err(call_fail(e, &url)),
        };
        let v: Value = match serde_json::from_reader(resp.into_reader()) {
            Ok(v) => v,
            Err(_) => return Ok(None),
        };
        let sha = v.get("sha").and_then(Value::as_str).map(str::to_string);
        let siblings: Option<Vec<String>> = v.get("siblings").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(|s| s.get("rfilename").and_then(Value::as_str))
                .map(str::to_string)
                .collect()
        });
        match (sha, siblings) {
            (Some(sha), Some(s)) if safe_component(&sha) => Ok(Some((sha, s))),
            _ => Ok(None),
        }
    }

    /// HEAD a file's resolve URL. A redirect that carries the file's metadata (commit, etag) is
    /// the LFS one: it names where the body lives, and is not followed. One without (a renamed
    /// repo) is followed while it stays on the same host, as `huggingface_hub` does.
    fn head(&self, rev: &str, file: &str) -> Result<Meta, Fail> {
        let mut url = self.resolve_url(rev, file);
        for _ in 0..10 {
            let req = self
                .head_agent
                .head(&url)
                .set("Accept-Encoding", "identity");
            let resp = self
                .auth(req, &url)
                .call()
                .map_err(|e| call_fail(e, &url))?;
            let status = resp.status();
            let mut location = url.clone();
            if (300..400).contains(&status) {
                let loc = resp.header("Location").ok_or_else(|| {
                    Fail::Other(format!("{url}: redirect {status} without a Location"))
                })?;
                let target = if loc.starts_with('/') {
                    format!("{}{loc}", origin(&url))
                } else {
                    loc.to_string()
                };
                let has_meta = resp.header("X-Repo-Commit").is_some()
                    && (resp.header("X-Linked-Etag").is_some() || resp.header("ETag").is_some());
                if !has_meta && origin(&target) == origin(&url) {
                    url = target;
                    continue;
                }
                location = target;
            }
            let commit = resp
                .header("X-Repo-Commit")
                .map(str::to_string)
                .filter(|c| safe_component(c))
                .ok_or_else(|| {
                    Fail::Other(format!(
                        "{url}: no X-Repo-Commit header (is HF_ENDPOINT a Hugging Face hub?)"
                    ))
                })?;
            let etag = resp
                .header("X-Linked-Etag")
                .or_else(|| resp.header("ETag"))
                .map(normalize_etag)
                .filter(|e| safe_component(e))
                .ok_or_else(|| Fail::Other(format!("{url}: no usable ETag header")))?;
            let size = resp
                .header("X-Linked-Size")
                .or_else(|| resp.header("Content-Length"))
                .and_then(|s| s.trim().parse().ok());
            return Ok(Meta {
                commit,
                etag,
                size,
                url: location,
            });
        }
        Err(Fail::Other(format!("{url}: too many redirects")))
    }

    /// Make sure `blobs/<etag>` exists: download it (resuming `blobs/<etag>.incomplete`),
    /// check it, and move it into place.
    fn ensure_blob(&self, repo_dir: &Path, name: &str, meta: &Meta) -> Result<PathBuf, Fail> {
        let blobs = repo_dir.join("blobs");
        let blob = blobs.join(&meta.etag);
        if blob.exists() {
            return Ok(blob);
        }
        std::fs::create_dir_all(&blobs).map_err(|e| local(&blobs, e))?;
        tag_cache_dir(&self.hub.cache_dir);
        // The lock huggingface_hub takes, so a Python process and we never write one blob at once.
        let locks = self
            .hub
            .cache_dir
            .join(".locks")
            .join(repo_folder_name(self.model));
        std::fs::create_dir_all(&locks).map_err(|e| local(&locks, e))?;
        let lock_path = locks.join(format!("{}.lock", meta.etag));
        let lock = File::create(&lock_path).map_err(|e| local(&lock_path, e))?;
        lock.lock().map_err(|e| local(&lock_path, e))?;
        if blob.exists() {
            return Ok(blob);
        }

        let part = blobs.join(format!("{}.incomplete", meta.etag));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part)
            .map_err(|e| local(&part, e))?;
        let mut progress = Progress::new(self.hub.progress, name, meta.size);
        let mut complete = false;
        let mut last_err = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 * attempt as u64));
            }
            let mut have = file.metadata().map_err(|e| local(&part, e))?.len();
            if let Some(size) = meta.size {
                if have == size {
                    complete = true;
                    break;
                }
                if have > size {
                    file.set_len(0).map_err(|e| local(&part, e))?;
                    have = 0;
                }
            }
            let mut req = self
                .get_agent
                .get(&meta.url)
                .set("Accept-Encoding", "identity");
            if have > 0 {
                req = req.set("Range", &format!("bytes={have}-"));
            }
            let resp = match self.auth(req, &meta.url).call() {
                Ok(r) => r,
                Err(ureq::Error::Status(416, _)) => {
                    file.set_len(0).map_err(|e| local(&part, e))?;
                    last_err = "the server refused to resume (416)".into();
                    continue;
                }
                Err(ureq::Error::Transport(t)) => {
                    last_err = t.to_string();
                    continue;
                }
                Err(e) => return Err(call_fail(e, &meta.url)),
            };
            let start = match resp.status() {
                206 if content_range_start(&resp) == Some(have) => have,
                200 | 206 => 0,
                s => {
                    return Err(Fail::Other(format!(
                        "{}: unexpected status {s} for a file download",
                        meta.url
                    )))
                }
            };
            file.set_len(start).map_err(|e| local(&part, e))?;
            file.seek(SeekFrom::Start(start))
                .map_err(|e| local(&part, e))?;
            progress.set(start);
            let mut reader = resp.into_reader();
            let mut buf = vec![0u8; 1 << 16];
            let read = loop {
                match reader.read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        file.write_all(&buf[..n]).map_err(|e| local(&part, e))?;
                        progress.add(n as u64);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            file.flush().map_err(|e| local(&part, e))?;
            let len = file.metadata().map_err(|e| local(&part, e))?.len();
            match read {
                Err(e) => last_err = format!("connection lost at byte {len}: {e}"),
                Ok(()) if meta.size.is_some_and(|s| s != len) => {
                    last_err = format!("connection closed at byte {len}");
                }
                Ok(()) => {
                    complete = true;
                    break;
                }
            }
        }
        progress.finish();
        if !complete {
            return Err(Fail::Other(format!(
                "`{name}` did not finish after {MAX_ATTEMPTS} attempts ({last_err}); run again to \
                 resume from `{}`",
                part.display()
            )));
        }
        drop(file);
        if let Err(detail) = verify(&part, &meta.etag, meta.size) {
            let _ = std::fs::remove_file(&part);
            return Err(Fail::Other(format!(
                "`{name}`: {detail}; the download was discarded"
            )));
        }
        std::fs::rename(&part, &blob).map_err(|e| local(&blob, e))?;
        Ok(blob)
    }

    /// Turn a failure into the library's error, naming the model and what to do.
    fn error(&self, rev: &str, fail: Fail) -> Error {
        let endpoint = self.hub.endpoint.clone();
        let download = |detail: String| Error::Download {
            model: self.model.to_string(),
            endpoint: endpoint.clone(),
            detail,
        };
        match fail {
            Fail::Local(e) => e,
            Fail::Other(d) => download(d),
            Fail::Unreachable(why) => not_found(
                self.model,
                rev,
                self.hub,
                &format!(
                    "the hub at {endpoint} could not be reached ({why}): connect to the network \
                     or set HF_ENDPOINT to a reachable mirror, or"
                ),
            ),
            Fail::Status {
                status,
                code,
                message,
                url,
            } => {
                let said = message.map(|m| format!(" ({m})")).unwrap_or_default();
                let detail = match (status, code.as_deref()) {
                    (401, _) => format!(
                        "{url}: 401 Unauthorized{said}: the repo is gated or private, or does not \
                         exist; {}",
                        if self.hub.token.is_some() {
                            "the token (HF_TOKEN or the token file) was refused".to_string()
                        } else {
                            format!(
                                "no token was sent: set HF_TOKEN or put a token in `{}`",
                                token_path().display()
                            )
                        }
                    ),
                    (403, _) => format!(
                        "{url}: 403 Forbidden{said}: the token has no access; a gated repo \
                         needs access granted at {endpoint}/{}",
                        self.model
                    ),
                    (404, Some("RevisionNotFound")) => {
                        format!("{url}: 404: no revision `{rev}`{said}")
                    }
                    (404, Some("EntryNotFound")) => format!("{url}: 404: no such file{said}"),
                    (404, _) => {
                        return not_found(
                            self.model,
                            rev,
                            self.hub,
                            &format!(
                                "{endpoint} has no such repo ({url}: 404{said}); check the id, or"
                            ),
                        )
                    }
                    (s, _) => format!("{url}: HTTP {s}{said}"),
                };
                download(detail)
            }
        }
    }
}

/// The `CACHEDIR.TAG` huggingface_hub writes at the cache root, so backup tools skip the cache.
fn tag_cache_dir(cache: &Path) {
    const TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
                       # This file is a cache directory tag created by huggingface_hub.\n\
                       # For information about cache directory tags, see:\n\
                       #\thttps://bford.info/cachedir/\n";
    let path = cache.join("CACHEDIR.TAG");
    if !path.exists() {
        let _ = std::fs::write(path, TAG);
    }
}

/// `bytes START-END/TOTAL` -> START.
fn content_range_start(resp: &ureq::Response) -> Option<u64> {
    let v = resp.header("Content-Range")?;
    let v = v.trim().strip_prefix("bytes")?.trim_start();
    v.split('-').next()?.trim().parse().ok()
}

/// The shard file names of a `*.index.json` (`weight_map` values), sorted and unique.
fn shards_of(index: &Path) -> Result<Vec<String>, Fail> {
    let text = std::fs::read_to_string(index).map_err(|e| local(index, e))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| Fail::Local(Error::invalid_file(index, e)))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Fail::Local(Error::invalid_file(index, "no `weight_map` object")))?;
    let shards: BTreeSet<String> = map
        .values()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    Ok(shards.into_iter().collect())
}

/// The module folders of a sentence-transformers `modules.json` (the transformer's own, `""`,
/// is the repo root).
fn module_folders(modules: &Path) -> Result<Vec<String>, Fail> {
    let text = std::fs::read_to_string(modules).map_err(|e| local(modules, e))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| Fail::Local(Error::invalid_file(modules, e)))?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m.get("path").and_then(Value::as_str))
                .filter(|p| !p.is_empty() && safe_rel(p))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default())
}

/// Check a finished download: its size, and its content against the etag when the etag is a
/// checksum (LFS files: sha256; git files: the git blob sha1).
fn verify(path: &Path, etag: &str, size: Option<u64>) -> std::result::Result<(), String> {
    let is_hex = |n: usize| etag.len() == n && etag.bytes().all(|b| b.is_ascii_hexdigit());
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if let Some(s) = size {
        if s != len {
            return Err(format!("got {len} bytes, the hub announced {s}"));
        }
    }
    let digest = if is_hex(64) {
        let mut h = sha2::Sha256::new();
        hash_file(path, &mut h)?;
        hex(&h.finalize())
    } else if is_hex(40) {
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {len}\0").as_bytes());
        hash_file(path, &mut h)?;
        hex(&h.finalize())
    } else {
        return Ok(());
    };
    if digest.eq_ignore_ascii_case(etag) {
        Ok(())
    } else {
        Err(format!("checksum mismatch (expected {etag}, got {digest})"))
    }
}

fn hash_file(path: &Path, h: &mut impl Digest) -> std::result::Result<(), String> {
    let mut f = File::open(path).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `snapshots/<commit>/<file>` -> `../../blobs/<etag>` (one more `../` per subfolder), as
/// `huggingface_hub` links them. Written only once every blob is in place.
fn link_snapshot(
    repo_dir: &Path,
    commit: &str,
    files: &[(String, String)],
) -> Result<PathBuf, Fail> {
    let snapshot = repo_dir.join("snapshots").join(commit);
    for (name, etag) in files {
        let link = snapshot.join(name);
        let parent = link.parent().unwrap_or(&snapshot);
        std::fs::create_dir_all(parent).map_err(|e| local(parent, e))?;
        let target = PathBuf::from("../".repeat(name.matches('/').count() + 2))
            .join("blobs")
            .join(etag);
        if let Ok(m) = std::fs::symlink_metadata(&link) {
            if std::fs::read_link(&link).is_ok_and(|t| t == target) {
                continue;
            }
            let removed = if m.is_dir() {
                std::fs::remove_dir_all(&link)
            } else {
                std::fs::remove_file(&link)
            };
            removed.map_err(|e| local(&link, e))?;
        }
        make_link(&target, &link).map_err(|e| local(&link, e))?;
    }
    Ok(snapshot)
}

#[cfg(unix)]
fn make_link(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

/// Where symlinks are not available, a copy (what `huggingface_hub` falls back to as well).
#[cfg(not(unix))]
fn make_link(target: &Path, link: &Path) -> std::io::Result<()> {
    let blob = link.parent().unwrap_or(Path::new(".")).join(target);
    std::fs::copy(blob, link).map(|_| ())
}

/// `refs/<revision>` holds the commit, without a newline.
fn write_ref(repo_dir: &Path, rev: &str, commit: &str) -> Result<(), Fail> {
    let path = repo_dir.join("refs").join(rev);
    if std::fs::read_to_string(&path).is_ok_and(|c| c == commit) {
        return Ok(());
    }
    let parent = path.parent().unwrap_or(repo_dir);
    std::fs::create_dir_all(parent).map_err(|e| local(parent, e))?;
    let tmp = parent.join(format!(
        ".{}.{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, commit).map_err(|e| local(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| local(&path, e))
}

/// `W/"abc"` -> `abc`.
fn normalize_etag(e: &str) -> String {
    e.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// One path component that is safe as a file name (etag, commit).
fn safe_component(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A relative path inside a repo (no `..`, not absolute): a file name from the server is never
/// allowed to point outside the cache.
fn safe_rel(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('/')
        && !s.contains('\\')
        && s.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Percent-encode for a URL path segment (`keep_slash`: a file path keeps its `/`).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` apply to the hub at `endpoint`: not for a
/// loopback hub, nor a host that `NO_PROXY` lists (ureq 2 reads the proxy but not `NO_PROXY`).
fn use_env_proxy(endpoint: &str) -> bool {
    let host = host_of(endpoint);
    if host == "localhost" || host == "[::1]" || host.starts_with("127.") {
        return false;
    }
    let no_proxy = std::env::var("NO_PROXY")
        .or_else(|_| std::env::var("no_proxy"))
        .unwrap_or_default();
    !no_proxy.split(',').map(str::trim).any(|n| {
        let n = n.trim_start_matches('.');
        n == "*" || (!n.is_empty() && (host == n || host.ends_with(&format!(".{n}"))))
    })
}

/// `host` of `scheme://host[:port]/...`.
fn host_of(url: &str) -> &str {
    let o = origin(url);
    let after = o.find("://").map(|i| i + 3).unwrap_or(0);
    let hp = &o[after..];
    if hp.starts_with('[') {
        return hp.split_inclusive(']').next().unwrap_or(hp);
    }
    hp.split(':').next().unwrap_or(hp)
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let after = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after..].find('/') {
        Some(i) => &url[..after + i],
        None => url,
    }
}

/// A download's progress bar on stderr (indicatif: bytes, rate, time left), drawn only when
/// [`HubOptions::progress`] says so.
struct Progress(indicatif::ProgressBar);

const SIZED_BAR: &str =
    "{msg:<40} {percent:>3}% [{bar:24}] {bytes}/{total_bytes} {bytes_per_sec} {eta}";
const UNSIZED_BAR: &str = "{msg:<40} {bytes} {bytes_per_sec}";

impl Progress {
    fn new(on: bool, label: &str, total: Option<u64>) -> Self {
        if !on {
            return Progress(indicatif::ProgressBar::hidden());
        }
        let label = if label.chars().count() > 40 {
            let skip = label.chars().count() - 39;
            format!("…{}", label.chars().skip(skip).collect::<String>())
        } else {
            label.to_string()
        };
        let (bar, template) = match total {
            Some(t) if t > 0 => (indicatif::ProgressBar::new(t), SIZED_BAR),
            _ => (indicatif::ProgressBar::no_length(), UNSIZED_BAR),
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("## "));
        }
        bar.set_message(label);
        Progress(bar)
    }

    fn set(&mut self, n: u64) {
        self.0.set_position(n);
    }

    fn add(&mut self, n: u64) {
        self.0.inc(n);
    }

    fn finish(&mut self) {
        self.0.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_templates_parse() {
        for t in [SIZED_BAR, UNSIZED_BAR] {
            assert!(indicatif::ProgressStyle::with_template(t).is_ok(), "{t}");
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn selects_safetensors_tokenizer_and_st_modules() {
        let siblings = names(&[
            ".gitattributes",
            "README.md",
            "config.json",
            "model.safetensors",
            "pytorch_model.bin",
            "tf_model.h5",
            "onnx/model.onnx",
            "tokenizer.json",
            "vocab.txt",
            "modules.json",
            "sentence_bert_config.json",
            "1_Pooling/config.json",
            "2_Dense/config.json",
            "2_Dense/model.safetensors",
            "2_Dense/pytorch_model.bin",
        ]);
        assert_eq!(
            select_files(&siblings),
            names(&[
                "config.json",
                "tokenizer.json",
                "vocab.txt",
                "modules.json",
                "sentence_bert_config.json",
                "model.safetensors",
                "1_Pooling/config.json",
                "2_Dense/config.json",
                "2_Dense/model.safetensors",
            ])
        );
    }

    #[test]
    fn selects_bin_index_or_single_gguf() {
        let s = names(&["config.json", "pytorch_model.bin.index.json", "x.bin"]);
        assert_eq!(
            select_files(&s),
            names(&["config.json", "pytorch_model.bin.index.json"])
        );
        let s = names(&["README.md", "m.Q4_1.gguf"]);
        assert_eq!(select_files(&s), names(&["m.Q4_1.gguf"]));
        let s = names(&["a.gguf", "b.gguf", "modules.json", "1_Pooling"]);
        assert_eq!(select_files(&s), names(&["modules.json"]));
    }

    #[test]
    fn small_helpers() {
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(
            encode("1_Pooling/config.json", true),
            "1_Pooling/config.json"
        );
        assert_eq!(origin("http://127.0.0.1:80/a/b"), "http://127.0.0.1:80");
        assert_eq!(origin("https://huggingface.co"), "https://huggingface.co");
        assert_eq!(host_of("http://127.0.0.1:80/a"), "127.0.0.1");
        assert_eq!(host_of("http://[::1]:80/a"), "[::1]");
        assert_eq!(host_of("https://huggingface.co"), "huggingface.co");
        assert!(!use_env_proxy("http://127.0.0.1:8080"));
        assert!(!use_env_proxy("http://localhost"));
        assert!(safe_rel("1_Pooling/config.json"));
        assert!(!safe_rel("../x"));
        assert!(!safe_rel("/etc/passwd"));
        assert!(!safe_rel("a//b"));
        assert!(!safe_component("a/b"));
        assert!(is_module_folder("1_Pooling"));
        assert!(!is_module_folder("onnx"));
    }
}
