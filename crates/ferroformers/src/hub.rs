//! Model id or path -> a local folder (or file).
//!
//! A `--model` value is either a path that exists, or a hub id (`org/name`) looked up in the
//! Hugging Face cache exactly as `huggingface_hub` lays it out:
//! `<cache>/models--org--name/refs/<revision>` holds a commit id, and the files live in
//! `<cache>/models--org--name/snapshots/<commit>/`. Downloading slots in behind [`resolve`].

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
/// looked up in the cache at `revision` (default `main`).
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
        return Err(Error::ModelNotFound {
            model: model.to_string(),
            looked_for: format!("a local path `{model}` (it does not exist)"),
        });
    }
    let revision = revision.unwrap_or("main");
    let repo = cache.join(repo_folder_name(model));
    let snapshots = repo.join("snapshots");
    let ref_file = repo.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&ref_file) {
        Ok(c) => Some(c.trim().to_string()),
        // A commit hash can be given directly as the revision.
        Err(_) if is_commit_hash(revision) => Some(revision.to_string()),
        Err(_) => None,
    };
    if let Some(commit) = commit {
        let snap = snapshots.join(&commit);
        if snap.is_dir() {
            return Ok(snap);
        }
    }
    Err(Error::ModelNotFound {
        model: model.to_string(),
        looked_for: format!(
            "a local path `{model}` (none), then revision `{revision}` in the hub cache \
             (`{}` with `{}`); put the model there (e.g. scripts/fetch-models.sh) or pass a local \
             folder",
            snapshots.display(),
            ref_file.display()
        ),
    })
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
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
