//! Hub downloads against a fake hub on 127.0.0.1 (tests/support/fake_hub.rs): the cache layout
//! `huggingface_hub` writes, byte for byte; no network on a second resolve; 404, 401 and token,
//! dropped connections resumed with `Range`, checksums, offline and unreachable hubs.
//!
//! Every test passes its endpoint, cache and token in a `HubOptions`: no process-wide variables.

#[path = "support/fake_hub.rs"]
mod fake_hub;

use std::path::{Path, PathBuf};

use fake_hub::{pattern, FakeHub, HubFile, Repo, TempDir};
use ferroformers::hub::{self, HubOptions};
use ferroformers::Error;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn opts(endpoint: &str, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: endpoint.to_string(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: false,
        progress: false,
    }
}

/// A sentence-transformers-like repo: git files, an LFS safetensors, a .bin that must be
/// skipped, a README that must be skipped, a pooling module.
fn st_repo() -> Vec<HubFile> {
    vec![
        HubFile::git(".gitattributes", b"*.safetensors filter=lfs\n"),
        HubFile::git("README.md", b"# tiny\n"),
        HubFile::git("config.json", br#"{"model_type":"bert"}"#),
        HubFile::git("tokenizer.json", br#"{"version":"1.0"}"#),
        HubFile::git("tokenizer_config.json", b"{}"),
        HubFile::git("vocab.txt", b"[PAD]\n[UNK]\nhello\n"),
        HubFile::git("modules.json", br#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},{"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"}]"#),
        HubFile::git("sentence_bert_config.json", br#"{"max_seq_length":128}"#),
        HubFile::git("1_Pooling/config.json", br#"{"pooling_mode_mean_tokens":true}"#),
        HubFile::lfs("model.safetensors", pattern(300_000, 1)),
        HubFile::lfs("pytorch_model.bin", pattern(1000, 2)),
        HubFile::lfs("onnx/model.onnx", pattern(1000, 3)),
    ]
}

const ST_FETCHED: &[&str] = &[
    "1_Pooling/config.json",
    "config.json",
    "model.safetensors",
    "modules.json",
    "sentence_bert_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
];

fn list_dir(dir: &Path) -> Vec<String> {
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

/// Every path under `dir`, relative, sorted (folders included, links not followed).
fn tree(dir: &Path) -> Vec<String> {
    fn walk(d: &Path, prefix: &str, out: &mut Vec<String>) {
        for name in list_dir(d) {
            let rel = format!("{prefix}{name}");
            let p = d.join(&name);
            out.push(rel.clone());
            if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                walk(&p, &format!("{rel}/"), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out);
    out.sort();
    out
}

/// The layout huggingface_hub writes, checked file by file.
fn assert_hf_layout(cache: &Path, repo_id: &str, files: &[HubFile], wanted: &[&str]) {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snap = repo.join("snapshots").join(COMMIT);
    let mut blobs = Vec::new();
    for name in wanted {
        let f = files.iter().find(|f| f.name == *name).unwrap();
        let link = snap.join(name);
        let meta = std::fs::symlink_metadata(&link).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(meta.file_type().is_symlink(), "{name} is not a symlink");
        let depth = name.matches('/').count();
        let target = format!("{}blobs/{}", "../".repeat(depth + 2), f.etag());
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            PathBuf::from(&target),
            "{name}"
        );
        assert_eq!(std::fs::read(&link).unwrap(), f.bytes, "{name} content");
        assert_eq!(
            std::fs::read(repo.join("blobs").join(f.etag())).unwrap(),
            f.bytes
        );
        blobs.push(f.etag());
    }
    blobs.sort();
    blobs.dedup();
    assert_eq!(
        list_dir(&repo.join("blobs")),
        blobs,
        "blobs/ holds exactly these"
    );
    let mut want_tree: Vec<String> = wanted.iter().map(|s| s.to_string()).collect();
    for w in wanted {
        if let Some((d, _)) = w.split_once('/') {
            want_tree.push(d.to_string());
        }
    }
    want_tree.sort();
    want_tree.dedup();
    assert_eq!(tree(&snap), want_tree, "snapshot holds exactly these");
}

#[test]
fn download_writes_the_huggingface_hub_layout_and_second_resolve_is_offline() {
    let hub_srv = FakeHub::start();
    let files = st_repo();
    hub_srv.add("org/tiny", Repo::new(COMMIT, files.clone()));
    let cache = TempDir::new();
    let o = opts(&hub_srv.url, &cache.0);

    let dir = hub::resolve_or_download_with("org/tiny", None, &o).unwrap();
    let repo = cache.0.join("models--org--tiny");
    assert_eq!(dir, repo.join("snapshots").join(COMMIT));
    assert_hf_layout(&cache.0, "org/tiny", &files, ST_FETCHED);
    // refs/main: the commit, no newline.
    assert_eq!(
        std::fs::read(repo.join("refs/main")).unwrap(),
        COMMIT.as_bytes()
    );
    assert_eq!(list_dir(&repo.join("refs")), vec!["main"]);
    assert_eq!(list_dir(&repo), vec!["blobs", "refs", "snapshots"]);
    assert_eq!(
        std::fs::read_to_string(cache.0.join("CACHEDIR.TAG")).unwrap(),
        "Signature: 8a477f597d28d172789f06886806bc55\n\
         # This file is a cache directory tag created by huggingface_hub.\n\
         # For information about cache directory tags, see:\n\
         #\thttps://bford.info/cachedir/\n"
    );

    // What was asked: the file list, then HEAD (+ GET) per needed file, at the commit.
    let log = hub_srv.log();
    assert_eq!(log[0].method, "GET");
    assert_eq!(log[0].path, "/api/models/org/tiny/revision/main");
    for r in &log {
        assert!(!r.path.contains("pytorch_model.bin"), "{r:?}");
        assert!(!r.path.contains("README"), "{r:?}");
        assert!(!r.path.contains("onnx"), "{r:?}");
        assert!(r.header("Authorization").is_none(), "no token, no header");
        if r.path.contains("/resolve/") {
            assert!(r.path.contains(&format!("/resolve/{COMMIT}/")), "{r:?}");
        }
    }
    let heads = log.iter().filter(|r| r.method == "HEAD").count();
    assert_eq!(heads, ST_FETCHED.len());
    assert!(
        log.iter().any(|r| r.path.starts_with("/cdn/")),
        "LFS via the redirect"
    );

    // Second time: straight from the cache, not one request.
    let before = hub_srv.requests();
    assert_eq!(
        hub::resolve_or_download_with("org/tiny", None, &o).unwrap(),
        dir
    );
    assert_eq!(hub::resolve_in("org/tiny", None, &cache.0).unwrap(), dir);
    assert_eq!(hub_srv.requests(), before);

    // `ferroformers cache` sees it.
    let scanned = hub::scan_cache(&cache.0).unwrap();
    assert_eq!(scanned.len(), 1);
    assert_eq!(scanned[0].repo_id, "org/tiny");
    assert_eq!(
        scanned[0].refs,
        vec![("main".to_string(), COMMIT.to_string())]
    );
    assert_eq!(scanned[0].snapshots[0].files, ST_FETCHED);
    let total: u64 = ST_FETCHED
        .iter()
        .map(|n| files.iter().find(|f| f.name == *n).unwrap().bytes.len() as u64)
        .sum();
    assert_eq!(scanned[0].size_on_disk, total);
    assert_eq!(scanned[0].incomplete_bytes, 0);

    // Downloading again fetches no blob (they are there), only asks for metadata.
    let before = hub_srv.requests();
    hub::download("org/tiny", None, None, &o).unwrap();
    let again = &hub_srv.log()[before..];
    assert!(again
        .iter()
        .all(|r| r.method != "GET" || r.path.starts_with("/api/")));
}

#[test]
fn short_pinned_revision_is_downloaded_as_given_and_found_by_prefix() {
    let hub_srv = FakeHub::start();
    let files = vec![
        HubFile::git("config.json", b"{}"),
        HubFile::lfs("model.safetensors", pattern(5000, 7)),
    ];
    hub_srv.add("org/pinned", Repo::new(COMMIT, files.clone()));
    let cache = TempDir::new();
    let o = opts(&hub_srv.url, &cache.0);
    let dir = hub::resolve_or_download_with("org/pinned", Some("0123456"), &o).unwrap();
    let repo = cache.0.join("models--org--pinned");
    assert_eq!(dir, repo.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read(repo.join("refs/0123456")).unwrap(),
        COMMIT.as_bytes()
    );
    assert!(hub_srv.log()[0].path.ends_with("/revision/0123456"));
    assert_hf_layout(
        &cache.0,
        "org/pinned",
        &files,
        &["config.json", "model.safetensors"],
    );

    // Another prefix of the same commit, with no ref for it: found among the snapshots.
    let before = hub_srv.requests();
    let p = hub::resolve_or_download_with("org/pinned", Some("0123456789ab"), &o).unwrap();
    assert_eq!(p, dir);
    assert_eq!(
        hub::cached_snapshot("org/pinned", "0123456789", &cache.0),
        Some(dir.clone())
    );
    assert_eq!(
        hub::cached_snapshot("org/pinned", "fedcba9", &cache.0),
        None
    );
    // A full commit hash names its snapshot.
    assert_eq!(
        hub::resolve_in("org/pinned", Some(COMMIT), &cache.0).unwrap(),
        dir
    );
    assert_eq!(hub_srv.requests(), before);
}

#[test]
fn sharded_safetensors_bring_their_shards() {
    let hub_srv = FakeHub::start();
    let index = br#"{"metadata":{"total_size":3000},"weight_map":{"a.weight":"model-00001-of-00002.safetensors","b.weight":"model-00002-of-00002.safetensors","c.weight":"model-00001-of-00002.safetensors"}}"#;
    let files = vec![
        HubFile::git("config.json", b"{}"),
        HubFile::git("model.safetensors.index.json", index),
        HubFile::lfs("model-00001-of-00002.safetensors", pattern(2000, 4)),
        HubFile::lfs("model-00002-of-00002.safetensors", pattern(1000, 5)),
        HubFile::lfs("pytorch_model-00001-of-00002.bin", pattern(10, 6)),
    ];
    hub_srv.add("org/sharded", Repo::new(COMMIT, files.clone()));
    let cache = TempDir::new();
    hub::resolve_or_download_with("org/sharded", None, &opts(&hub_srv.url, &cache.0)).unwrap();
    assert_hf_layout(
        &cache.0,
        "org/sharded",
        &files,
        &[
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
        ],
    );
}

#[test]
fn without_the_file_list_api_files_are_probed() {
    let hub_srv = FakeHub::start();
    let files = st_repo();
    let mut repo = Repo::new(COMMIT, files.clone());
    repo.api = false;
    hub_srv.add("org/probed", repo);
    let cache = TempDir::new();
    hub::resolve_or_download_with("org/probed", None, &opts(&hub_srv.url, &cache.0)).unwrap();
    assert_hf_layout(&cache.0, "org/probed", &files, ST_FETCHED);
    let log = hub_srv.log();
    assert!(
        !log.iter()
            .any(|r| r.method == "GET" && r.path.contains("pytorch_model.bin")),
        "safetensors found first: no .bin"
    );
}

#[test]
fn gated_repo_needs_the_token_and_gets_it_as_bearer() {
    let hub_srv = FakeHub::start();
    let files = vec![
        HubFile::git("config.json", b"{}"),
        HubFile::lfs("model.safetensors", pattern(3000, 8)),
    ];
    let mut repo = Repo::new(COMMIT, files.clone());
    repo.gated_token = Some("hf_secret".into());
    hub_srv.add("org/gated", repo);
    let cache = TempDir::new();
    let mut o = opts(&hub_srv.url, &cache.0);

    let err = hub::resolve_or_download_with("org/gated", None, &o).unwrap_err();
    assert!(matches!(err, Error::Download { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("org/gated") && msg.contains("401"), "{msg}");
    assert!(msg.contains("HF_TOKEN"), "{msg}");
    let repo_dir = cache.0.join("models--org--gated");
    assert!(!repo_dir.join("snapshots").exists() && !repo_dir.join("refs").exists());

    o.token = Some("wrong".into());
    let msg = hub::download("org/gated", None, None, &o)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("token") && msg.contains("refused"), "{msg}");

    o.token = Some("hf_secret".into());
    let before = hub_srv.requests();
    hub::resolve_or_download_with("org/gated", None, &o).unwrap();
    assert_hf_layout(
        &cache.0,
        "org/gated",
        &files,
        &["config.json", "model.safetensors"],
    );
    for r in &hub_srv.log()[before..] {
        assert_eq!(r.header("Authorization"), Some("Bearer hf_secret"), "{r:?}");
    }
}

#[test]
fn missing_repo_revision_and_file_are_404_errors() {
    let hub_srv = FakeHub::start();
    hub_srv.add(
        "org/tiny",
        Repo::new(COMMIT, vec![HubFile::git("config.json", b"{}")]),
    );
    let cache = TempDir::new();
    let o = opts(&hub_srv.url, &cache.0);

    let err = hub::resolve_or_download_with("org/absent", None, &o).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("org/absent") && msg.contains("404"), "{msg}");
    assert!(msg.contains("models--org--absent"), "{msg}");

    let msg = hub::download("org/tiny", Some("v9"), None, &o)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no revision `v9`"), "{msg}");

    let files = vec!["nope.json".to_string()];
    let msg = hub::download("org/tiny", None, Some(&files), &o)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("nope.json") && msg.contains("404"), "{msg}");
    assert!(list_dir(&cache.0).is_empty(), "{:?}", tree(&cache.0));
}

#[test]
fn dropped_connection_resumes_with_range() {
    let hub_srv = FakeHub::start();
    let files = vec![
        HubFile::git("config.json", b"{}"),
        HubFile::lfs("model.safetensors", pattern(200_000, 9)),
    ];
    hub_srv.add("org/flaky", Repo::new(COMMIT, files.clone()));
    hub_srv.state.lock().unwrap().drops_left = 1;
    let cache = TempDir::new();
    hub::resolve_or_download_with("org/flaky", None, &opts(&hub_srv.url, &cache.0)).unwrap();
    assert_hf_layout(
        &cache.0,
        "org/flaky",
        &files,
        &["config.json", "model.safetensors"],
    );
    let cdn: Vec<_> = hub_srv
        .log()
        .into_iter()
        .filter(|r| r.path.starts_with("/cdn/"))
        .collect();
    assert_eq!(cdn.len(), 2, "{cdn:?}");
    assert_eq!(cdn[0].header("Range"), None);
    assert_eq!(cdn[1].header("Range"), Some("bytes=100000-"));
}

#[test]
fn an_unfinished_download_leaves_only_its_incomplete_blob_and_resumes_next_time() {
    let hub_srv = FakeHub::start();
    let big = HubFile::lfs("model.safetensors", pattern(64_000, 10));
    let files = vec![HubFile::git("config.json", b"{}"), big.clone()];
    hub_srv.add("org/flaky", Repo::new(COMMIT, files.clone()));
    hub_srv.state.lock().unwrap().drops_left = 1000;
    let cache = TempDir::new();
    let o = opts(&hub_srv.url, &cache.0);

    let err = hub::resolve_or_download_with("org/flaky", None, &o).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("did not finish") && msg.contains("run again"),
        "{msg}"
    );
    let repo = cache.0.join("models--org--flaky");
    assert_eq!(list_dir(&repo), vec!["blobs"], "no refs, no snapshot");
    let part = format!("{}.incomplete", big.etag());
    let blobs = list_dir(&repo.join("blobs"));
    assert!(blobs.contains(&part), "{blobs:?}");
    let got = std::fs::metadata(repo.join("blobs").join(&part))
        .unwrap()
        .len();
    assert!(got > 0 && got < 64_000, "{got}");
    assert!(hub::resolve_in("org/flaky", None, &cache.0).is_err());
    assert_eq!(hub::scan_cache(&cache.0).unwrap()[0].incomplete_bytes, got);

    // The hub behaves again: the next run resumes from where the last one stopped.
    hub_srv.state.lock().unwrap().drops_left = 0;
    let before = hub_srv.requests();
    hub::resolve_or_download_with("org/flaky", None, &o).unwrap();
    let first_cdn = hub_srv.log()[before..]
        .iter()
        .find(|r| r.path.starts_with("/cdn/"))
        .cloned()
        .unwrap();
    assert_eq!(
        first_cdn.header("Range"),
        Some(format!("bytes={got}-").as_str())
    );
    assert_hf_layout(
        &cache.0,
        "org/flaky",
        &files,
        &["config.json", "model.safetensors"],
    );
}

#[test]
fn a_corrupted_body_is_refused() {
    let hub_srv = FakeHub::start();
    hub_srv.add(
        "org/bad",
        Repo::new(
            COMMIT,
            vec![
                HubFile::git("config.json", b"{}"),
                HubFile::lfs("model.safetensors", pattern(1000, 11)),
            ],
        ),
    );
    hub_srv.state.lock().unwrap().corrupt = true;
    let cache = TempDir::new();
    let msg = hub::resolve_or_download_with("org/bad", None, &opts(&hub_srv.url, &cache.0))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("checksum mismatch"), "{msg}");
    let repo = cache.0.join("models--org--bad");
    assert_eq!(list_dir(&repo), vec!["blobs"]);
    // Only the (good) config blob: the bad one was discarded, not kept as .incomplete.
    assert_eq!(list_dir(&repo.join("blobs")).len(), 1);
}

#[test]
fn offline_or_unreachable_gives_one_clear_error_and_writes_nothing() {
    let cache = TempDir::new();
    let mut o = opts("http://127.0.0.1:9", &cache.0);
    o.offline = true;
    let err = hub::resolve_or_download_with("org/model", None, &o).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("org/model"), "{msg}");
    assert!(msg.contains("models--org--model"), "{msg}");
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
    assert!(msg.contains("ferroformers download"), "{msg}");

    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let o = opts(&format!("http://127.0.0.1:{closed}"), &cache.0);
    let err = hub::resolve_or_download_with("org/model", Some("v1"), &o).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("could not be reached"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{closed}")), "{msg}");
    assert!(msg.contains("revision `v1`"), "{msg}");
    assert!(list_dir(&cache.0).is_empty(), "{:?}", tree(&cache.0));

    // Offline, a cached model is still found.
    let hub_srv = FakeHub::start();
    hub_srv.add(
        "org/model",
        Repo::new(
            COMMIT,
            vec![
                HubFile::git("config.json", b"{}"),
                HubFile::lfs("model.safetensors", pattern(10, 12)),
            ],
        ),
    );
    let dir = hub::download("org/model", None, None, &opts(&hub_srv.url, &cache.0)).unwrap();
    let mut o = opts("http://127.0.0.1:9", &cache.0);
    o.offline = true;
    assert_eq!(
        hub::resolve_or_download_with("org/model", None, &o).unwrap(),
        dir
    );
    assert_eq!(hub::download("org/model", None, None, &o).unwrap(), dir);
}

#[test]
fn several_gguf_files_ask_which_one() {
    let hub_srv = FakeHub::start();
    hub_srv.add(
        "org/gguf",
        Repo::new(
            COMMIT,
            vec![
                HubFile::lfs("m.Q4_0.gguf", pattern(100, 13)),
                HubFile::lfs("m.Q8_0.gguf", pattern(200, 14)),
            ],
        ),
    );
    let cache = TempDir::new();
    let o = opts(&hub_srv.url, &cache.0);
    let msg = hub::download("org/gguf", None, None, &o)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("m.Q4_0.gguf") && msg.contains("--file"),
        "{msg}"
    );
    let want = vec!["m.Q8_0.gguf".to_string()];
    let dir = hub::download("org/gguf", None, Some(&want), &o).unwrap();
    assert_eq!(list_dir(&dir), want);
}

#[test]
fn a_renamed_repo_is_followed_and_cached_under_the_asked_id() {
    let hub_srv = FakeHub::start();
    let files = vec![
        HubFile::git("config.json", b"{}"),
        HubFile::lfs("model.safetensors", pattern(777, 15)),
    ];
    hub_srv.add("org/new-name", Repo::new(COMMIT, files.clone()));
    hub_srv
        .state
        .lock()
        .unwrap()
        .renamed
        .insert("org/old-name".into(), "org/new-name".into());
    let cache = TempDir::new();
    let mut o = opts(&hub_srv.url, &cache.0);
    o.token = Some("hf_x".into());
    hub::resolve_or_download_with("org/old-name", None, &o).unwrap();
    assert_hf_layout(
        &cache.0,
        "org/old-name",
        &files,
        &["config.json", "model.safetensors"],
    );
    let log = hub_srv.log();
    assert!(log
        .iter()
        .any(|r| r.path.starts_with("/org/new-name/resolve/")));
    // The token follows a redirect on the hub's own host.
    assert!(log
        .iter()
        .all(|r| r.header("Authorization") == Some("Bearer hf_x")));
}

#[test]
fn a_short_revision_the_api_refuses_is_probed_on_the_resolve_route() {
    let hub_srv = FakeHub::start();
    let files = vec![
        HubFile::git("config.json", b"{}"),
        HubFile::lfs("model.safetensors", pattern(500, 16)),
    ];
    let mut repo = Repo::new(COMMIT, files.clone());
    repo.api_full_revisions_only = true;
    hub_srv.add("org/short", repo);
    let cache = TempDir::new();
    let o = opts(&hub_srv.url, &cache.0);
    let dir = hub::resolve_or_download_with("org/short", Some("0123456"), &o).unwrap();
    assert!(dir.ends_with(COMMIT));
    assert_hf_layout(
        &cache.0,
        "org/short",
        &files,
        &["config.json", "model.safetensors"],
    );
    let refs = cache.0.join("models--org--short/refs/0123456");
    assert_eq!(std::fs::read(refs).unwrap(), COMMIT.as_bytes());
    // A revision that exists nowhere is still an error.
    let msg = hub::download("org/short", Some("fedcba9"), None, &o)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no revision `fedcba9`"), "{msg}");
}
