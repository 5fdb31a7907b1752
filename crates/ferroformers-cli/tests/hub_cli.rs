//! `ferroformers download`, `cache` and `tasks` end to end, against a fake hub on 127.0.0.1
//! (the one of the library's download tests) or no hub at all.

#[path = "../../ferroformers/tests/support/fake_hub.rs"]
mod fake_hub;

use std::path::Path;
use std::process::{Command, Output};

use fake_hub::{pattern, FakeHub, HubFile, Repo, TempDir};

const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// The binary with a private cache and hub settings (nothing inherited from the caller's).
fn ff(args: &[&str], cache: &Path, env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferroformers"));
    c.args(args)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HOME", cache.join("home"))
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("TRANSFORMERS_OFFLINE")
        .env("HF_ENDPOINT", "http://127.0.0.1:9");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn download_then_cache_lists_it_then_run_needs_no_hub() {
    let hub = FakeHub::start();
    hub.add(
        "org/tiny",
        Repo::new(
            COMMIT,
            vec![
                HubFile::git("config.json", br#"{"model_type":"bert"}"#),
                HubFile::git("README.md", b"hi"),
                HubFile::lfs("model.safetensors", pattern(4096, 1)),
            ],
        ),
    );
    let cache = TempDir::new();
    let o = ff(
        &["download", "org/tiny", "--revision", "main"],
        &cache.0,
        &[("HF_ENDPOINT", &hub.url), ("HF_TOKEN", "hf_cli")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let snap = cache.0.join("models--org--tiny/snapshots").join(COMMIT);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        snap.to_str().unwrap()
    );
    assert_eq!(entries(&snap), vec!["config.json", "model.safetensors"]);
    assert!(
        stderr(&o).is_empty(),
        "quiet when stderr is not a terminal: {}",
        stderr(&o)
    );
    assert!(hub
        .log()
        .iter()
        .all(|r| r.header("Authorization") == Some("Bearer hf_cli")));

    let o = ff(&["cache"], &cache.0, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("org/tiny"), "{out}");
    assert!(out.contains("main -> 89abcdef0123"), "{out}");
    assert!(out.contains("config.json model.safetensors"), "{out}");

    // In the cache now: `download` offline answers from it.
    let o = ff(
        &["download", "org/tiny"],
        &cache.0,
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn offline_or_unreachable_download_fails_clearly_and_leaves_nothing() {
    let cache = TempDir::new();
    let o = ff(
        &["download", "org/missing"],
        &cache.0,
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.starts_with("error: model `org/missing` not found"),
        "{err}"
    );
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("models--org--missing"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");

    let o = ff(&["download", "org/missing"], &cache.0, &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("could not be reached") && err.contains("127.0.0.1:9"),
        "{err}"
    );

    let o = ff(
        &["run", "fill-mask", "--model", "org/missing", "a [MASK]"],
        &cache.0,
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("org/missing"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    assert!(entries(&cache.0).is_empty(), "{:?}", entries(&cache.0));
}

#[test]
fn tasks_lists_every_task_and_cache_handles_an_empty_cache() {
    let cache = TempDir::new();
    let o = ff(&["tasks"], &cache.0, &[]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for t in [
        "text-classification",
        "sentiment-analysis",
        "fill-mask",
        "question-answering",
    ] {
        assert!(out.contains(t), "{t}: {out}");
    }
    assert!(!out.contains("cached"), "{out}");
    let o = ff(&["cache"], &cache.0, &[]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("(empty)"));
    let o = ff(&["download"], &cache.0, &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).starts_with("error: "));
}
