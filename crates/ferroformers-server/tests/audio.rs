//! Speech recognition through the server on loopback with the tiny Whisper and wav2vec2
//! fixtures: OpenAI's `/v1/audio/transcriptions` and `/translations` (multipart bodies built by
//! hand) in every response format, and the HF Inference API's audio bodies, each answering the
//! text the library pipeline gives for the same file and parameters; every refused request
//! gets its status and OpenAI's error shape.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use ferroformers::{Input, Params, Pipeline, PipelineOptions};
use ferroformers_server::{Config, ModelSpec, Server};
use serde_json::{json, Value};

const KEY: &str = "audio-key";
const LIMIT: usize = 1_000_000;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A fixture's canonical path (a URL path cannot hold `..`).
fn path(rel: &str) -> String {
    std::fs::canonicalize(fixtures().join(rel))
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

fn whisper() -> String {
    path("whisper/models/whisper-random")
}
fn whisper_en() -> String {
    path("whisper/models/whisper-random-en")
}
fn ctc() -> String {
    path("wav2vec2/models/w2v-stable")
}
fn text_model() -> String {
    path("models/bert-seqcls")
}

fn clip(rel: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(rel)).unwrap()
}

/// One server for the whole file (tests run in parallel against it).
fn base() -> &'static str {
    static BASE: OnceLock<String> = OnceLock::new();
    BASE.get_or_init(|| {
        let cfg = Config {
            models: vec![
                ModelSpec::parse(&whisper()),
                ModelSpec::parse(&whisper_en()),
                ModelSpec::parse(&ctc()),
                ModelSpec::parse(&text_model()),
            ],
            port: 0,
            api_key: Some(KEY.into()),
            payload_limit: LIMIT,
            quiet: true,
            cors_allow_origin: vec!["*".into()],
            ..Config::default()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let server = Server::bind(cfg).await.unwrap();
                tx.send(server.local_addr().unwrap()).unwrap();
                server.run().await.unwrap();
            });
        });
        format!("http://{}", rx.recv().unwrap())
    })
}

/// The library pipeline of a model (loaded once).
fn pipe(model: &str) -> std::sync::Arc<Pipeline> {
    static PIPES: OnceLock<Mutex<HashMap<String, std::sync::Arc<Pipeline>>>> = OnceLock::new();
    let mut m = PIPES.get_or_init(Default::default).lock().unwrap();
    m.entry(model.to_string())
        .or_insert_with(|| {
            std::sync::Arc::new(
                ferroformers::pipeline_with(
                    "automatic-speech-recognition",
                    PipelineOptions {
                        model: Some(model.to_string()),
                        ..Default::default()
                    },
                )
                .unwrap(),
            )
        })
        .clone()
}

/// What the library answers for a file's bytes with `params`.
fn library(model: &str, bytes: &[u8], params: Value) -> Value {
    let params: Params = serde_json::from_value(params).unwrap();
    let out = pipe(model)
        .run(&[Input::AudioBytes(bytes.to_vec())], &params)
        .unwrap();
    serde_json::to_value(&out[0]).unwrap()
}

/// A `multipart/form-data` body: text fields, then the file part.
fn multipart(fields: &[(&str, &str)], file: Option<&[u8]>) -> (String, Vec<u8>) {
    let boundary = "ferroformers-test-boundary-7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .as_bytes(),
        );
    }
    if let Some(bytes) = file {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; \
                 filename=\"clip\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// POST raw bytes; (status, content type, body text).
fn send(url: &str, content_type: &str, body: &[u8], key: Option<&str>) -> (u16, String, String) {
    let mut req = ureq::post(url).set("Content-Type", content_type);
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let resp = match req.send_bytes(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{url}: {e}"),
    };
    let status = resp.status();
    let ct = resp.content_type().to_string();
    (status, ct, resp.into_string().unwrap())
}

/// POST a form to an OpenAI audio route (`transcriptions` or `translations`).
fn form(route: &str, fields: &[(&str, &str)], file: Option<&[u8]>) -> (u16, String, String) {
    let (ct, body) = multipart(fields, file);
    send(
        &format!("{}/v1/audio/{route}", base()),
        &ct,
        &body,
        Some(KEY),
    )
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
}

/// Subtitles from the library's chunks, as the server should write them.
fn subtitles(chunks: &Value, duration: f64, vtt: bool) -> String {
    let t = |s: f64| {
        let ms = (s * 1000.0).round() as u64;
        let sep = if vtt { '.' } else { ',' };
        format!(
            "{:02}:{:02}:{:02}{sep}{:03}",
            ms / 3_600_000,
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000
        )
    };
    let mut out = if vtt {
        "WEBVTT\n\n".to_string()
    } else {
        String::new()
    };
    let mut prev = 0.0;
    for (i, c) in chunks.as_array().unwrap().iter().enumerate() {
        let start = c["timestamp"][0].as_f64().unwrap_or(prev);
        let end = c["timestamp"][1].as_f64().unwrap_or(duration.max(start));
        prev = end;
        if !vtt {
            out.push_str(&format!("{}\n", i + 1));
        }
        out.push_str(&format!(
            "{} --> {}\n{}\n\n",
            t(start),
            t(end),
            c["text"].as_str().unwrap().trim()
        ));
    }
    out
}

fn duration_of(bytes: &[u8]) -> f64 {
    ferroformers::audio::decode_bytes(bytes)
        .unwrap()
        .duration_s()
}

/// Every response format on Whisper equals the pipeline's text (greedy at temperature 0), for
/// clips at 16 kHz and other rates, WAV and FLAC.
#[test]
fn whisper_transcriptions_match_the_pipeline_in_every_format() {
    let model = whisper();
    for clip_name in [
        "whisper/audio/chirp_2s.wav",
        "whisper/speech.flac",
        "audio/stereo48k.flac",
    ] {
        let bytes = clip(clip_name);
        let duration = duration_of(&bytes);
        let greedy = library(&model, &bytes, json!({"num_beams": 1}));
        let fields = [("model", model.as_str())];

        let (status, ct, body) = form("transcriptions", &fields, Some(&bytes));
        assert_eq!(status, 200, "{clip_name}: {body}");
        assert!(ct.starts_with("application/json"), "{ct}");
        let v = json_of(&body);
        assert_eq!(v["text"], greedy["text"], "{clip_name}");
        assert_eq!(v["usage"]["type"], "duration");
        assert_eq!(v["usage"]["seconds"], json!(duration.ceil() as u64));

        let (status, ct, body) = form(
            "transcriptions",
            &[("model", &model), ("response_format", "text")],
            Some(&bytes),
        );
        assert_eq!(status, 200, "{body}");
        assert!(ct.starts_with("text/plain"), "{ct}");
        assert_eq!(body, greedy["text"].as_str().unwrap(), "{clip_name}");

        let stamped = library(
            &model,
            &bytes,
            json!({"num_beams": 1, "return_timestamps": true}),
        );
        let spoken = pipe(&model)
            .spoken_languages(&[Input::AudioBytes(bytes.clone())])
            .unwrap()
            .unwrap();
        let chunks = &stamped["chunks"];
        let (status, _, body) = form(
            "transcriptions",
            &[
                ("model", &model),
                ("response_format", "verbose_json"),
                ("timestamp_granularities[]", "segment"),
            ],
            Some(&bytes),
        );
        assert_eq!(status, 200, "{body}");
        let v = json_of(&body);
        assert_eq!(v["task"], "transcribe");
        assert_eq!(v["text"], stamped["text"], "{clip_name}");
        assert!((v["duration"].as_f64().unwrap() - duration).abs() < 1e-9);
        assert_eq!(v["language"], spoken[0], "{clip_name}");
        if clip_name.contains("chirp_2s") {
            // tests/fixtures/whisper/expected: transformers detects <|la|> on this clip.
            assert_eq!(v["language"], "latin");
        }
        let segs = v["segments"].as_array().unwrap();
        assert_eq!(segs.len(), chunks.as_array().unwrap().len(), "{body}");
        // Each segment carries its window's statistics (the pipeline's `return_window_stats`,
        // which changes nothing else).
        let with_stats = library(
            &model,
            &bytes,
            json!({"num_beams": 1, "return_timestamps": true, "return_window_stats": true}),
        );
        assert_eq!(&with_stats["chunks"], chunks);
        let windows = with_stats["windows"].as_array().unwrap();
        assert!(!windows.is_empty());
        for s in segs {
            let start = s["start"].as_f64().unwrap();
            let w = windows
                .iter()
                .rev()
                .find(|w| w["start"].as_f64().unwrap() <= start + 1e-6)
                .unwrap();
            assert_eq!(s["seek"], w["seek"], "{s}");
            // Through JSON text and back (serde_json parses floats to within an ulp).
            for key in ["avg_logprob", "compression_ratio", "no_speech_prob"] {
                let (a, b) = (s[key].as_f64().unwrap(), w[key].as_f64().unwrap());
                assert!((a - b).abs() <= 1e-12 * b.abs(), "{key} of {s}: {b}");
            }
            let (lp, ns) = (
                s["avg_logprob"].as_f64().unwrap(),
                s["no_speech_prob"].as_f64().unwrap(),
            );
            assert!(lp <= 0.0 && (0.0..=1.0).contains(&ns), "{s}");
            assert!(s["compression_ratio"].as_f64().unwrap() >= 0.0, "{s}");
        }
        for (i, (s, c)) in segs.iter().zip(chunks.as_array().unwrap()).enumerate() {
            assert_eq!(s["id"], i);
            assert_eq!(s["text"], c["text"]);
            // An open start or end (the pipeline's `null`) closes at its neighbours.
            if !c["timestamp"][0].is_null() {
                assert_eq!(s["start"], c["timestamp"][0]);
            }
            if !c["timestamp"][1].is_null() {
                assert_eq!(s["end"], c["timestamp"][1]);
            }
            assert!(s["start"].is_f64() && s["end"].is_f64(), "{s}");
            assert_eq!(s["temperature"], 0.0);
            assert!(s["tokens"].is_array() && s["seek"].is_u64(), "{s}");
        }
        assert!(v.get("words").is_none());

        for (format, vtt) in [("srt", false), ("vtt", true)] {
            let (status, _, body) = form(
                "transcriptions",
                &[("model", &model), ("response_format", format)],
                Some(&bytes),
            );
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                body,
                subtitles(chunks, duration, vtt),
                "{clip_name} {format}"
            );
        }
    }
}

/// `language`, translation, sampling with a seed, long audio, the English-only model, and the
/// first speech model when `model` is left out.
#[test]
fn whisper_options_match_the_pipeline() {
    let model = whisper();
    let bytes = clip("whisper/audio/mix_5.5s.wav");
    let text = |v: &Value| v["text"].clone();

    let want = library(&model, &bytes, json!({"num_beams": 1, "language": "fr"}));
    let (status, _, body) = form(
        "transcriptions",
        &[("model", &model), ("language", "fr")],
        Some(&bytes),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(text(&json_of(&body)), text(&want));

    let want = library(&model, &bytes, json!({"num_beams": 1, "task": "translate"}));
    let (status, _, body) = form("translations", &[("model", &model)], Some(&bytes));
    assert_eq!(status, 200, "{body}");
    assert_eq!(text(&json_of(&body)), text(&want));
    let (status, _, body) = form(
        "translations",
        &[("model", &model), ("response_format", "verbose_json")],
        Some(&bytes),
    );
    assert_eq!(status, 200, "{body}");
    let v = json_of(&body);
    assert_eq!(
        (v["task"].as_str(), v["language"].as_str()),
        (Some("translate"), Some("english"))
    );

    let want = library(&model, &bytes, json!({"temperature": 0.8, "seed": 11}));
    let fields = [
        ("model", model.as_str()),
        ("temperature", "0.8"),
        ("seed", "11"),
    ];
    let (status, _, body) = form("transcriptions", &fields, Some(&bytes));
    assert_eq!(status, 200, "{body}");
    assert_eq!(text(&json_of(&body)), text(&want));

    // `prompt`: the pipeline's `prompt_ids`, `<|startofprev|>` and the prompt's tokens.
    let tok = ferroformers::tokenizer::Tokenizer::from_dir(
        std::path::Path::new(&model),
        "whisper",
        Some(448),
    )
    .unwrap();
    let mut ids = vec![tok.token_to_id("<|startofprev|>").unwrap()];
    ids.extend(tok.encode_with(" hello world", None, false).unwrap().ids);
    let want = library(
        &model,
        &bytes,
        json!({"num_beams": 1, "generate_kwargs": {"prompt_ids": ids}}),
    );
    let plain = library(&model, &bytes, json!({"num_beams": 1}));
    assert_ne!(text(&want), text(&plain), "the prompt changes nothing");
    let (status, _, body) = form(
        "transcriptions",
        &[("model", &model), ("prompt", "  hello world ")],
        Some(&bytes),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(text(&json_of(&body)), text(&want));

    // No `model`: the first speech model served.
    let want = library(&model, &bytes, json!({"num_beams": 1}));
    let (status, _, body) = form("transcriptions", &[], Some(&bytes));
    assert_eq!(status, 200, "{body}");
    assert_eq!(text(&json_of(&body)), text(&want));

    // Over 30 s: long-form decoding (timestamps on) in every format.
    let long = clip("whisper/speech-long.flac");
    assert!(duration_of(&long) > 30.0);
    let want = library(
        &model,
        &long,
        json!({"num_beams": 1, "return_timestamps": true}),
    );
    let (status, _, body) = form("transcriptions", &[("model", &model)], Some(&long));
    assert_eq!(status, 200, "{body}");
    assert_eq!(text(&json_of(&body)), text(&want));

    // English-only: `en` is what it does anyway; no translation, no other language.
    let en = whisper_en();
    let want = library(&en, &bytes, json!({"num_beams": 1}));
    let (status, _, body) = form(
        "transcriptions",
        &[("model", &en), ("language", "en")],
        Some(&bytes),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(text(&json_of(&body)), text(&want));
    let (status, _, body) = form(
        "transcriptions",
        &[("model", &en), ("response_format", "verbose_json")],
        Some(&bytes),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body)["language"], "english");
    for (route, fields) in [
        (
            "transcriptions",
            vec![("model", en.as_str()), ("language", "de")],
        ),
        ("translations", vec![("model", en.as_str())]),
    ] {
        let (status, _, body) = form(route, &fields, Some(&bytes));
        assert_eq!(status, 400, "{route}: {body}");
        assert!(body.contains("English-only"), "{body}");
    }
}

/// Whisper word timestamps: the pipeline's `return_timestamps="word"` chunks, alone or beside
/// the segments of a `return_timestamps=true` run, on short and long (sequential) audio.
#[test]
fn whisper_word_timestamps_match_the_pipeline() {
    for (model, clip_name) in [
        (whisper(), "whisper/audio/mix_5.5s.wav"),
        (whisper_en(), "whisper/speech-long.flac"),
    ] {
        let bytes = clip(clip_name);
        let words = library(
            &model,
            &bytes,
            json!({"num_beams": 1, "return_timestamps": "word"}),
        );
        let segments = library(
            &model,
            &bytes,
            json!({"num_beams": 1, "return_timestamps": true}),
        );
        let chunks = words["chunks"].as_array().unwrap();
        assert!(!chunks.is_empty(), "{clip_name}: {words}");
        for both in [false, true] {
            let mut fields = vec![
                ("model", model.as_str()),
                ("response_format", "verbose_json"),
                ("timestamp_granularities[]", "word"),
            ];
            if both {
                fields.push(("timestamp_granularities[]", "segment"));
            }
            let (status, _, body) = form("transcriptions", &fields, Some(&bytes));
            assert_eq!(status, 200, "{clip_name}: {body}");
            let v = json_of(&body);
            assert_eq!(v["text"], words["text"], "{clip_name}");
            let got = v["words"].as_array().unwrap();
            assert_eq!(got.len(), chunks.len(), "{clip_name}: {body}");
            for (w, c) in got.iter().zip(chunks) {
                assert_eq!(w["word"], c["text"]);
                assert_eq!(w["start"], c["timestamp"][0]);
                assert_eq!(w["end"], c["timestamp"][1]);
            }
            if both {
                let segs = v["segments"].as_array().unwrap();
                let want = segments["chunks"].as_array().unwrap();
                assert_eq!(segs.len(), want.len(), "{clip_name}: {body}");
                for (s, c) in segs.iter().zip(want) {
                    assert_eq!(s["text"], c["text"]);
                    // An open start (null) is the previous segment's end in OpenAI's shape.
                    if !c["timestamp"][0].is_null() {
                        assert_eq!(s["start"], c["timestamp"][0]);
                    }
                }
            } else {
                assert!(v.get("segments").is_none(), "{body}");
            }
        }
    }
}

/// A CTC model: the pipeline's text; word timestamps from its word chunks; one segment.
#[test]
fn ctc_transcriptions_match_the_pipeline() {
    let model = ctc();
    for clip_name in [
        "whisper/audio/chirp_2s.wav",
        "audio/mono16k.ogg",
        "audio/stereo44k.mp3",
    ] {
        let bytes = clip(clip_name);
        let duration = duration_of(&bytes);
        let want = library(&model, &bytes, json!({}));
        let (status, _, body) = form("transcriptions", &[("model", &model)], Some(&bytes));
        assert_eq!(status, 200, "{body}");
        assert_eq!(json_of(&body)["text"], want["text"], "{clip_name}");

        let words = library(&model, &bytes, json!({"return_timestamps": "word"}));
        let (status, _, body) = form(
            "transcriptions",
            &[
                ("model", &model),
                ("response_format", "verbose_json"),
                ("timestamp_granularities[]", "word"),
                ("timestamp_granularities[]", "segment"),
            ],
            Some(&bytes),
        );
        assert_eq!(status, 200, "{body}");
        let v = json_of(&body);
        assert_eq!(v["text"], words["text"]);
        assert_eq!(v["language"], Value::Null);
        let got = v["words"].as_array().unwrap();
        let chunks = words["chunks"].as_array().unwrap();
        assert_eq!(got.len(), chunks.len(), "{body}");
        for (w, c) in got.iter().zip(chunks) {
            assert_eq!(w["word"], c["text"]);
            assert_eq!(w["start"], c["timestamp"][0]);
            assert_eq!(w["end"], c["timestamp"][1]);
        }
        let segs = v["segments"].as_array().unwrap();
        if !want["text"].as_str().unwrap().is_empty() {
            assert_eq!(segs.len(), 1);
            assert_eq!(segs[0]["text"], want["text"]);
            assert_eq!(segs[0]["start"], 0.0);
            assert!((segs[0]["end"].as_f64().unwrap() - duration).abs() < 1e-9);
        }
    }
}

/// The HF Inference API: the file's bytes as the body, or base64 in `{inputs, parameters}`,
/// answer what the pipeline gives with its own defaults.
#[test]
fn inference_api_takes_audio_bodies() {
    let model = whisper();
    let bytes = clip("whisper/audio/chirp_2s.wav");
    let want = library(&model, &bytes, json!({}));
    for (url, ct) in [
        (format!("{}/models/{model}", base()), "audio/wav"),
        (format!("{}/", base()), "application/octet-stream"),
        (
            format!(
                "{}/models/{model}/pipeline/automatic-speech-recognition",
                base()
            ),
            "audio/x-wav",
        ),
    ] {
        let (status, _, body) = send(&url, ct, &bytes, Some(KEY));
        assert_eq!(status, 200, "{url}: {body}");
        assert_eq!(json_of(&body), want, "{url}");
    }
    let b64 = base64(&bytes);
    let stamped = library(&model, &bytes, json!({"return_timestamps": true}));
    let req = json!({"inputs": b64, "parameters": {"return_timestamps": true}});
    let (status, _, body) = send(
        &format!("{}/models/{model}", base()),
        "application/json",
        req.to_string().as_bytes(),
        Some(KEY),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body), stamped);
    // A list, one as a data URL.
    let req = json!({"inputs": [b64, format!("data:audio/wav;base64,{b64}")]});
    let (status, _, body) = send(
        &format!("{}/models/{model}", base()),
        "application/json",
        req.to_string().as_bytes(),
        Some(KEY),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body), json!([want, want]));
    let ctc_model = ctc();
    let (status, _, body) = send(
        &format!("{}/models/{ctc_model}", base()),
        "audio/wav",
        &bytes,
        Some(KEY),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(json_of(&body), library(&ctc_model, &bytes, json!({})));
    // A string is base64 audio, never a path on the server.
    let req = json!({"inputs": fixtures().join("whisper/speech.flac").display().to_string()});
    let (status, _, body) = send(
        &format!("{}/models/{model}", base()),
        "application/json",
        req.to_string().as_bytes(),
        Some(KEY),
    );
    assert_eq!(status, 400, "{body}");
    // Audio to a text model; undecodable audio.
    let (status, _, body) = send(
        &format!("{}/models/{}", base(), text_model()),
        "audio/wav",
        &bytes,
        Some(KEY),
    );
    assert_eq!(status, 400, "{body}");
    assert!(json_of(&body)["error"].as_str().unwrap().contains("speech"));
    let (status, _, body) = send(
        &format!("{}/models/{model}", base()),
        "audio/wav",
        b"not audio at all",
        Some(KEY),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(json_of(&body)["error_type"], "BadRequest");
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= c.len() {
                T[(n >> shift) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    out
}

/// Each refused request: its status, OpenAI's error shape, the field it names.
#[test]
fn bad_audio_requests_get_openai_errors() {
    let wav = clip("whisper/audio/tone_0.3s.wav");
    let (w, c, t) = (whisper(), ctc(), text_model());
    let url = format!("{}/v1/audio/transcriptions", base());
    let (ct, ok_body) = multipart(&[("model", &w)], Some(&wav));
    // (what, the answer, its status, the `param` named, a piece of the message)
    type Case<'a> = (
        &'a str,
        (u16, String, String),
        u16,
        Option<&'a str>,
        &'a str,
    );
    let mut cases: Vec<Case> = vec![
        (
            "missing file",
            form("transcriptions", &[("model", &w)], None),
            400,
            Some("file"),
            "file",
        ),
        (
            "undecodable audio",
            form(
                "transcriptions",
                &[("model", &w)],
                Some(b"RIFF....WAVEjunk"),
            ),
            400,
            Some("file"),
            "decode",
        ),
        (
            "json body",
            send(&url, "application/json", b"{\"model\": \"x\"}", Some(KEY)),
            415,
            None,
            "multipart/form-data",
        ),
        (
            "too large",
            form(
                "transcriptions",
                &[("model", &w)],
                Some(&vec![7u8; LIMIT + 10]),
            ),
            413,
            None,
            "payload limit (1000000 bytes",
        ),
        (
            "unknown model",
            form("transcriptions", &[("model", "org/none")], Some(&wav)),
            404,
            Some("model"),
            "org/none",
        ),
        (
            "not a speech model",
            form("transcriptions", &[("model", &t)], Some(&wav)),
            400,
            Some("model"),
            "not a speech-recognition model",
        ),
        (
            "prompt on CTC",
            form(
                "transcriptions",
                &[("model", &c), ("prompt", "Hello")],
                Some(&wav),
            ),
            400,
            Some("prompt"),
            "CTC",
        ),
        (
            "bad format",
            form(
                "transcriptions",
                &[("model", &w), ("response_format", "xml")],
                Some(&wav),
            ),
            400,
            Some("response_format"),
            "xml",
        ),
        (
            "bad temperature",
            form(
                "transcriptions",
                &[("model", &w), ("temperature", "-1")],
                Some(&wav),
            ),
            400,
            Some("temperature"),
            "temperature",
        ),
        (
            "word timestamps without verbose_json",
            form(
                "transcriptions",
                &[("model", &c), ("timestamp_granularities[]", "word")],
                Some(&wav),
            ),
            400,
            Some("timestamp_granularities"),
            "verbose_json",
        ),
        (
            "sampling on CTC",
            form(
                "transcriptions",
                &[("model", &c), ("temperature", "0.5")],
                Some(&wav),
            ),
            400,
            Some("temperature"),
            "temperature",
        ),
        (
            "language on CTC",
            form(
                "transcriptions",
                &[("model", &c), ("language", "en")],
                Some(&wav),
            ),
            400,
            Some("language"),
            "language",
        ),
        (
            "translation on CTC",
            form("translations", &[("model", &c)], Some(&wav)),
            400,
            Some("model"),
            "translat",
        ),
        (
            "unknown language",
            form(
                "transcriptions",
                &[("model", &w), ("language", "klingon")],
                Some(&wav),
            ),
            400,
            Some("language"),
            "klingon",
        ),
        (
            "stream",
            form(
                "transcriptions",
                &[("model", &w), ("stream", "true")],
                Some(&wav),
            ),
            400,
            Some("stream"),
            "stream",
        ),
        (
            "no key",
            send(&url, &ct, b"", None),
            401,
            None,
            "Authorization",
        ),
        (
            "wrong key",
            send(&url, &ct, b"", Some("nope")),
            401,
            None,
            "Authorization",
        ),
    ];
    // The key is checked before the body is read: the two 401 cases send no body, since a
    // body the server never reads can meet a closed connection (broken pipe) on the client's
    // side, a race that made this test flaky.
    // A form without a file part.
    cases.push((
        "empty multipart",
        send(
            &url,
            "multipart/form-data; boundary=x",
            b"--x--\r\n",
            Some(KEY),
        ),
        400,
        Some("file"),
        "file",
    ));
    for (what, (status, _, body), want, param, needle) in cases {
        assert_eq!(status, want, "{what}: {body}");
        let v = json_of(&body);
        let e = &v["error"];
        let msg = e["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {body}"));
        assert!(msg.contains(needle), "{what}: {msg}");
        let kind = if want < 500 {
            "invalid_request_error"
        } else {
            "server_error"
        };
        assert_eq!(e["type"], kind, "{what}");
        assert_eq!(e["code"], want, "{what}");
        assert_eq!(e["param"].as_str(), param, "{what}: {body}");
    }
    // The good request answers.
    assert_eq!(send(&url, &ct, &ok_body, Some(KEY)).0, 200);
}

/// The speech models are listed, described, documented and counted like the others.
#[test]
fn speech_models_are_listed_documented_and_counted() {
    let get = |p: &str| {
        ureq::get(&format!("{}{p}", base()))
            .set("Authorization", &format!("Bearer {KEY}"))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    };
    let models = json_of(&get("/v1/models"));
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&whisper().as_str()) && ids.contains(&ctc().as_str()),
        "{ids:?}"
    );
    let info = json_of(&get("/info"));
    let tasks: Vec<&str> = info["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["task"].as_str().unwrap())
        .collect();
    assert_eq!(
        tasks
            .iter()
            .filter(|t| **t == "automatic-speech-recognition")
            .count(),
        3
    );
    let spec = json_of(&get("/api-doc/openapi.json"));
    for p in ["/v1/audio/transcriptions", "/v1/audio/translations"] {
        assert!(
            spec["paths"][p]["post"]["requestBody"]["content"]["multipart/form-data"].is_object(),
            "{p}"
        );
    }
    assert!(spec["paths"]["/models/{id}"]["post"]["requestBody"]["content"]["audio/*"].is_object());
    assert!(get("/docs").contains("/v1/audio/transcriptions"));
    let wav = clip("whisper/audio/tone_0.3s.wav");
    assert_eq!(
        form("transcriptions", &[("model", &whisper())], Some(&wav)).0,
        200
    );
    let metrics = get("/metrics");
    assert!(
        metrics.contains(
            "ferroformers_request_count{route=\"/v1/audio/transcriptions\",status=\"200\"}"
        ),
        "{metrics}"
    );
    // Browsers' preflight and origin header, as on the other routes.
    let pre = ureq::request("OPTIONS", &format!("{}/v1/audio/transcriptions", base()))
        .set("Origin", "https://app.example")
        .set("Access-Control-Request-Method", "POST")
        .call()
        .unwrap();
    assert_eq!(pre.status(), 204);
    assert_eq!(pre.header("access-control-allow-origin"), Some("*"));
}
