//! Model id or path -> a local folder (or file).
//!
//! A `--model` value is either a path that exists, or a hub id (`org/name`) looked up in the
//! Hugging Face cache exactly as `huggingface_hub` lays it out:
//! `<cache>/models--org--name/refs/<revision>` holds a commit id, and the files live in
//! `<cache>/models--org--name/snapshots/<commit>/` as relative symlinks into `blobs/`.
//! [`resolve`] only looks; [`resolve_or_download`] fetches what the cache lacks from the hub
//! (see [`download`]) unless `HF_HUB_OFFLINE` is set, so Python and Rust share one cache.

mod download;

pub use download::{download, select_files};

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The hub cache root: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = non_empty_env("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = non_empty_env("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = non_empty_env("HOME").unwrap_or_else(|| ".".to_string());
    PathBuf::from(home)
        .join(".cache")
        .join("huggingface")
        .join("hub")
}

fn non_empty_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// The cache folder name of a model repo: `org/name` -> `models--org--name`.
pub fn repo_folder_name(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

/// Whether `s` has the shape of a hub id (`name` or `org/name`).
pub fn is_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    !s.is_empty()
        && parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Resolve a model reference to a local path: an existing path is returned as is; a hub id is
/// looked up in the cache at `revision` (default `main`). Never touches the network; see
/// [`resolve_or_download`].
pub fn resolve(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    resolve_in(model, revision, &cache_dir())
}

/// [`resolve`] against an explicit cache root.
pub fn resolve_in(model: &str, revision: Option<&str>, cache: &Path) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if !is_hub_id(model) {
        return Err(not_a_path(model));
    }
    let revision = revision.unwrap_or("main");
    if let Some(snap) = cached_snapshot(model, revision, cache) {
        return Ok(snap);
    }
    let repo = cache.join(repo_folder_name(model));
    Err(Error::ModelNotFound {
        model: model.to_string(),
        looked_for: format!(
            "a local path `{model}` (none), then revision `{revision}` in the hub cache \
             (`{}` with `{}`); put the model there (`ferroformers download {model}`, \
             scripts/fetch-models.sh) or pass a local folder",
            repo.join("snapshots").display(),
            repo.join("refs").join(revision).display()
        ),
    })
}

fn not_a_path(model: &str) -> Error {
    Error::ModelNotFound {
        model: model.to_string(),
        looked_for: format!("a local path `{model}` (it does not exist)"),
    }
}

/// The snapshot folder of `repo_id` at `revision` in `cache`, if there is one: `refs/<revision>`
/// names the commit; a full commit hash names itself; a short hash (HF pins task defaults as
/// `714eb0f`) matches the one snapshot whose commit starts with it.
pub fn cached_snapshot(repo_id: &str, revision: &str, cache: &Path) -> Option<PathBuf> {
    let repo = cache.join(repo_folder_name(repo_id));
    let snapshots = repo.join("snapshots");
    if let Ok(c) = std::fs::read_to_string(repo.join("refs").join(revision)) {
        let snap = snapshots.join(c.trim());
        if !c.trim().is_empty() && snap.is_dir() {
            return Some(snap);
        }
    }
    if is_commit_hash(revision) {
        let snap = snapshots.join(revision);
        return snap.is_dir().then_some(snap);
    }
    if is_short_hash(revision) {
        let matches: Vec<PathBuf> = std::fs::read_dir(&snapshots)
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                is_commit_hash(&name) && name.starts_with(revision) && e.path().is_dir()
            })
            .map(|e| e.path())
            .collect();
        if matches.len() == 1 {
            return matches.into_iter().next();
        }
    }
    None
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

fn is_short_hash(s: &str) -> bool {
    (7..40).contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// Whether a snapshot folder holds a usable model: weights (safetensors, .bin, GGUF, CTranslate2's
/// `model.bin`, or their
/// shard index), or, for a tokenizer-only repo, tokenizer files and no `config.json`. A snapshot
/// that Python filled with `config.json` alone is not enough to run.
fn snapshot_is_usable(dir: &Path) -> bool {
    let has = |f: &str| dir.join(f).exists();
    let weights = [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        // CTranslate2 (faster-whisper) folders.
        "model.bin",
    ];
    if weights.iter().any(|f| has(f)) {
        return true;
    }
    let gguf = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().ends_with(".gguf") && e.path().exists())
        })
        .unwrap_or(false);
    gguf || (!has("config.json")
        && [
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
            "vocab.json",
        ]
        .iter()
        .any(|f| has(f)))
}

/// Where and how to reach the hub. [`HubOptions::from_env`] reads what `huggingface_hub` reads;
/// tests and tools build one explicitly instead of racing on process-wide variables.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// `$HF_ENDPOINT`, default `https://huggingface.co` (no trailing slash).
    pub endpoint: String,
    /// The cache root ([`cache_dir`]).
    pub cache_dir: PathBuf,
    /// `$HF_TOKEN`, else the token file (`$HF_TOKEN_PATH`, `$HF_HOME/token`,
    /// `~/.cache/huggingface/token`).
    pub token: Option<String>,
    /// `$HF_HUB_OFFLINE` (or `$TRANSFORMERS_OFFLINE`) is true: never touch the network.
    pub offline: bool,
    /// Draw a progress bar on stderr (default: when stderr is a terminal).
    pub progress: bool,
}

impl HubOptions {
    pub fn from_env() -> Self {
        use std::io::IsTerminal;
        let endpoint = non_empty_env("HF_ENDPOINT")
            .unwrap_or_else(|| "https://huggingface.co".to_string())
            .trim_end_matches('/')
            .to_string();
        let offline = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]
            .iter()
            .filter_map(|k| non_empty_env(k))
            .next()
            .is_some_and(|v| is_true(&v));
        Self {
            endpoint,
            cache_dir: cache_dir(),
            token: token_from_env(),
            offline,
            progress: std::io::stderr().is_terminal(),
        }
    }
}

fn is_true(v: &str) -> bool {
    matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
}

/// The token file `huggingface-cli login` writes: `$HF_TOKEN_PATH`, else `$HF_HOME/token`, else
/// `~/.cache/huggingface/token`.
pub fn token_path() -> PathBuf {
    if let Some(p) = non_empty_env("HF_TOKEN_PATH") {
        return PathBuf::from(p);
    }
    if let Some(p) = non_empty_env("HF_HOME") {
        return PathBuf::from(p).join("token");
    }
    let home = non_empty_env("HOME").unwrap_or_else(|| ".".to_string());
    PathBuf::from(home)
        .join(".cache")
        .join("huggingface")
        .join("token")
}

/// `$HF_TOKEN` (or the older `$HUGGING_FACE_HUB_TOKEN`), else the token file.
pub fn token_from_env() -> Option<String> {
    non_empty_env("HF_TOKEN")
        .or_else(|| non_empty_env("HUGGING_FACE_HUB_TOKEN"))
        .or_else(|| std::fs::read_to_string(token_path()).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Like [`resolve`], but a hub id missing from the cache is downloaded (unless offline), with
/// the settings of [`HubOptions::from_env`].
pub fn resolve_or_download(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    resolve_or_download_with(model, revision, &HubOptions::from_env())
}

/// [`resolve_or_download`] with explicit hub settings. A usable cached snapshot is returned
/// without any network request; otherwise the needed files are fetched into the cache.
pub fn resolve_or_download_with(
    model: &str,
    revision: Option<&str>,
    hub: &HubOptions,
) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if !is_hub_id(model) {
        return Err(not_a_path(model));
    }
    let rev = revision.unwrap_or("main");
    let cached = cached_snapshot(model, rev, &hub.cache_dir);
    match cached {
        Some(snap) if hub.offline || snapshot_is_usable(&snap) => Ok(snap),
        _ => download(model, revision, None, hub),
    }
}

/// One repo in the cache, as `ferroformers cache` lists it.
#[derive(Debug, Clone)]
pub struct CachedRepo {
    pub repo_id: String,
    pub path: PathBuf,
    /// Bytes of its blobs (what it takes on disk), partial downloads included.
    pub size_on_disk: u64,
    /// `(revision, commit)` from `refs/`.
    pub refs: Vec<(String, String)>,
    pub snapshots: Vec<CachedSnapshot>,
    /// Bytes in unfinished (`.incomplete`) downloads.
    pub incomplete_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct CachedSnapshot {
    pub commit: String,
    pub path: PathBuf,
    /// Files relative to the snapshot, `/`-separated, sorted.
    pub files: Vec<String>,
}

/// Every model repo in the cache at `cache`, sorted by id (an absent cache is empty).
pub fn scan_cache(cache: &Path) -> Result<Vec<CachedRepo>> {
    let rd = match std::fs::read_dir(cache) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(cache, e)),
    };
    let mut repos = Vec::new();
    for entry in rd.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(id) = name.strip_prefix("models--") else {
            continue;
        };
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let mut size_on_disk = 0;
        let mut incomplete_bytes = 0;
        if let Ok(rd) = std::fs::read_dir(path.join("blobs")) {
            for b in rd.filter_map(|e| e.ok()) {
                let len = b.metadata().map(|m| m.len()).unwrap_or(0);
                size_on_disk += len;
                if b.file_name().to_string_lossy().ends_with(".incomplete") {
                    incomplete_bytes += len;
                }
            }
        }
        let mut refs = Vec::new();
        walk_files(&path.join("refs"), "", &mut |rel, p| {
            let commit = std::fs::read_to_string(p).unwrap_or_default();
            refs.push((rel.to_string(), commit.trim().to_string()));
        });
        refs.sort();
        let mut snapshots = Vec::new();
        if let Ok(rd) = std::fs::read_dir(path.join("snapshots")) {
            for s in rd.filter_map(|e| e.ok()) {
                let mut files = Vec::new();
                walk_files(&s.path(), "", &mut |rel, _| files.push(rel.to_string()));
                files.sort();
                snapshots.push(CachedSnapshot {
                    commit: s.file_name().to_string_lossy().to_string(),
                    path: s.path(),
                    files,
                });
            }
        }
        snapshots.sort_by(|a, b| a.commit.cmp(&b.commit));
        repos.push(CachedRepo {
            repo_id: id.replace("--", "/"),
            path,
            size_on_disk,
            refs,
            snapshots,
            incomplete_bytes,
        });
    }
    repos.sort_by(|a, b| a.repo_id.cmp(&b.repo_id));
    Ok(repos)
}

/// Call `f(relative path, path)` for every file (or symlink to one) under `dir`.
fn walk_files(dir: &Path, prefix: &str, f: &mut dyn FnMut(&str, &Path)) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let p = e.path();
        if p.is_dir() {
            walk_files(&p, &rel, f);
        } else {
            f(&rel, &p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_id_shape() {
        assert!(is_hub_id("bert-base-uncased"));
        assert!(is_hub_id("sentence-transformers/all-MiniLM-L6-v2"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("../x"));
        assert!(!is_hub_id(""));
    }

    #[test]
    fn resolves_cache_layout() {
        let dir = std::env::temp_dir().join(format!("ff-hub-test-{}", std::process::id()));
        let repo = dir.join("models--org--tiny");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots").join(commit)).unwrap();
        std::fs::write(repo.join("refs").join("main"), commit).unwrap();
        let p = resolve_in("org/tiny", None, &dir).unwrap();
        assert_eq!(p, repo.join("snapshots").join(commit));
        let p = resolve_in("org/tiny", Some(commit), &dir).unwrap();
        assert_eq!(p, repo.join("snapshots").join(commit));
        let err = resolve_in("org/tiny", Some("v2"), &dir).unwrap_err();
        assert!(err.to_string().contains("refs/v2"), "{err}");
        let err = resolve_in("org/absent", None, &dir).unwrap_err();
        assert!(err.to_string().contains("models--org--absent"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
