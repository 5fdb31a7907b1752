//! Speech recognition over HTTP: OpenAI's `POST /v1/audio/transcriptions` and
//! `/v1/audio/translations` as vLLM implements them (`multipart/form-data`), and the HF
//! Inference API's audio bodies (raw bytes, or base64 in `{inputs}`) for `POST /` and
//! `/models/{id}`.
//!
//! What the OpenAI routes take and how it maps onto the pipeline:
//! - `file` (WAV, FLAC, MP3, OGG/Vorbis bytes): decoded once by the library's decoder, then run
//!   as a waveform (the pipeline resamples it exactly as it does the file's bytes);
//! - `model`: a served id (404 otherwise); absent: the first speech-recognition model;
//! - `language`: Whisper's language (code or name); an English-only Whisper model takes English
//!   and refuses others; a CTC model refuses it (it cannot be told a language);
//! - `prompt`: Whisper's `prompt_ids` (`<|startofprev|>` and the prompt's tokens, as
//!   `WhisperProcessor.get_prompt_ids` makes them; its last 223 tokens, as openai-whisper keeps),
//!   which every 30 s window is conditioned on; refused for CTC models;
//! - `temperature`: 0 (default) decodes greedily (`num_beams=1`, as vLLM; the pipeline's own
//!   default is 5 beams); above 0 Whisper samples at that temperature (`seed` makes it
//!   repeatable); a CTC model takes only 0. No temperature fallback;
//! - `response_format`: `json` (`{text, usage}`), `text`, `verbose_json`, `srt`, `vtt`; the
//!   last three run Whisper with `return_timestamps=true` and make segments of its chunks, as
//!   does audio over 30 s in any format (Whisper's sequential long-form decoding needs it);
//! - `timestamp_granularities[]`: `segment`, `word` (with `verbose_json`): a CTC model's word
//!   chunks, or Whisper's `return_timestamps="word"` chunks (its alignment heads'
//!   cross-attention); Whisper gives words or segments in one run, so asking both decodes
//!   twice;
//! - `stream=true` is refused; other fields are ignored, as vLLM does.
//!
//! `verbose_json`'s `language` is the one given, else the one Whisper detects (English for
//! English-only models, null for CTC models); its segments carry `id`, `seek`, `start`, `end`,
//! `text`, `tokens`, `temperature`, and for Whisper `avg_logprob`, `compression_ratio` and
//! `no_speech_prob` of the 30 s window each came from (the pipeline's `return_window_stats`:
//! `seek` is the window's start in 10 ms frames, as openai-whisper and faster-whisper give
//! them, with the same values on the same decoding). Approximations: `tokens` re-encode the
//! segment's text with the model's tokenizer (empty without one); a CTC model gives one
//! segment spanning the whole audio, `seek` 0 and no window statistics.

use std::path::Path;

use axum::extract::multipart::MultipartRejection;
use axum::extract::Multipart;

use super::*;

pub(crate) const ASR: &str = "automatic-speech-recognition";

/// The kind of speech model: what the OpenAI fields can ask of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Speech {
    Whisper { multilingual: bool },
    Ctc,
}

impl Speech {
    /// From a speech-recognition model's folder, as the library picks its pipeline.
    pub(crate) fn of_dir(dir: &Path) -> Speech {
        use ferroformers::pipelines::automatic_speech_recognition_ctc::CTC_TYPES;
        let ct2 = ferroformers::models::whisper::is_ct2_dir(dir);
        if !ct2 {
            if let Ok(c) = ferroformers::config::ModelConfig::from_dir(dir) {
                if CTC_TYPES.contains(&c.model_type.as_str()) {
                    return Speech::Ctc;
                }
            }
        }
        let read = |name: &str| -> Option<Value> {
            serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
        };
        // As the library decides: the generation config's `is_multilingual` (default true);
        // for CTranslate2 folders a vocabulary of at least 51865 tokens.
        let multilingual = if ct2 {
            read("vocabulary.json")
                .and_then(|v| v.as_array().map(Vec::len))
                .or_else(|| {
                    std::fs::read_to_string(dir.join("vocabulary.txt"))
                        .ok()
                        .map(|t| t.lines().count())
                })
                .is_none_or(|n| n >= 51865)
        } else {
            read("generation_config.json")
                .and_then(|g| g.get("is_multilingual").and_then(Value::as_bool))
                .unwrap_or(true)
        };
        Speech::Whisper { multilingual }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AudioTask {
    Transcribe,
    Translate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Text,
    VerboseJson,
    Srt,
    Vtt,
}

/// The fields of a transcription request.
#[derive(Default)]
struct Form {
    file: Option<Bytes>,
    fields: Vec<(String, String)>,
}

impl Form {
    /// The field's last value, empty counting as absent.
    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn all(&self, names: &[&str]) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(k, _)| names.contains(&k.as_str()))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn multipart_error(status: StatusCode, text: String, limit: usize) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "PayloadTooLarge",
            format!(
                "the request is larger than the server's payload limit ({limit} bytes; the \
                 server's --payload-limit raises it)"
            ),
        )
    } else {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("the multipart body does not parse: {text}"),
        )
    }
}

/// 415 without a multipart content type, 413 over the payload limit, 400 when it does not
/// parse.
async fn read_form(
    headers: &HeaderMap,
    form: Result<Multipart, MultipartRejection>,
    limit: usize,
) -> Result<Form, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.to_ascii_lowercase().starts_with("multipart/form-data") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "expected `Content-Type: multipart/form-data` with a `file` part (curl -F \
             file=@clip.flac -F model=ID)",
        ));
    }
    let mut mp = form.map_err(|e| multipart_error(e.status(), e.body_text(), limit))?;
    let mut out = Form::default();
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e.status(), e.body_text(), limit)),
        };
        let name = field.name().unwrap_or("").to_string();
        if name == "file" {
            let bytes = field
                .bytes()
                .await
                .map_err(|e| multipart_error(e.status(), e.body_text(), limit))?;
            out.file = Some(bytes);
        } else {
            let text = field
                .text()
                .await
                .map_err(|e| multipart_error(e.status(), e.body_text(), limit))?;
            out.fields.push((name, text));
        }
    }
    Ok(out)
}

/// The speech model a request names (404 for an unknown name, 400 for a model of another
/// task), else the first one served.
fn speech_model<'a>(state: &'a AppState, id: Option<&str>) -> Result<&'a Served, ApiError> {
    let m = match id {
        Some(id) => model(state, Some(id)).map_err(|e| e.with_param("model"))?,
        None => state
            .models
            .iter()
            .find(|m| m.speech.is_some())
            .ok_or_else(|| {
                ApiError::bad_request("model", "no automatic-speech-recognition model is served")
            })?,
    };
    if m.speech.is_none() {
        return Err(ApiError::bad_request(
            "model",
            format!(
                "`{}` is a {} model, not a speech-recognition model (serve a Whisper or wav2vec2 \
                 model: --model ID or ID=automatic-speech-recognition)",
                m.id, m.task
            ),
        ));
    }
    Ok(m)
}

/// What one OpenAI audio request asks, checked against the model.
struct AudioRequest {
    format: Format,
    temperature: f64,
    words: bool,
    segments: bool,
    language: Option<String>,
    seed: Option<u64>,
    /// Whisper's `prompt_ids` for `prompt`.
    prompt_ids: Option<Vec<u32>>,
}

/// `get_prompt_ids`: `<|startofprev|>` and the tokens of `" " + prompt.strip()`, its last
/// `448 / 2 - 1` (what a Whisper decoder can be conditioned on).
fn prompt_ids(m: &Served, prompt: &str) -> Result<Vec<u32>, ApiError> {
    let tok = m.tokenizer.as_ref().ok_or_else(|| {
        ApiError::backend(format!("`{}` has no tokenizer to encode `prompt`", m.id))
    })?;
    let prev = tok.token_to_id("<|startofprev|>").ok_or_else(|| {
        ApiError::backend(format!(
            "`{}`'s tokenizer has no <|startofprev|> token",
            m.id
        ))
    })?;
    let enc = tok
        .encode_with(&format!(" {}", prompt.trim()), None, false)
        .map_err(ApiError::backend)?;
    let keep = 448 / 2 - 1;
    let mut ids = vec![prev];
    ids.extend_from_slice(&enc.ids[enc.ids.len().saturating_sub(keep)..]);
    Ok(ids)
}

fn audio_request(form: &Form, m: &Served, task: AudioTask) -> Result<AudioRequest, ApiError> {
    let format = match form.get("response_format").unwrap_or("json") {
        "json" => Format::Json,
        "text" => Format::Text,
        "verbose_json" => Format::VerboseJson,
        "srt" => Format::Srt,
        "vtt" => Format::Vtt,
        other => {
            return Err(ApiError::bad_request(
                "response_format",
                format!("`response_format` is json, text, verbose_json, srt or vtt, not `{other}`"),
            ))
        }
    };
    if matches!(form.get("stream"), Some(s) if s != "false") {
        return Err(ApiError::bad_request(
            "stream",
            "streamed transcriptions are not supported: send `stream=false` or leave it out",
        ));
    }
    let temperature = match form.get("temperature") {
        None => 0.0,
        Some(t) => t
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|t| t.is_finite() && *t >= 0.0)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "temperature",
                    format!("`temperature` must be a number >= 0, not `{t}`"),
                )
            })?,
    };
    let seed = match form.get("seed") {
        None => None,
        Some(s) => Some(s.trim().parse::<u64>().map_err(|_| {
            ApiError::bad_request("seed", format!("`seed` must be an integer >= 0, not `{s}`"))
        })?),
    };
    let granularities = form.all(&["timestamp_granularities[]", "timestamp_granularities"]);
    for g in &granularities {
        if *g != "segment" && *g != "word" {
            return Err(ApiError::bad_request(
                "timestamp_granularities",
                format!("`timestamp_granularities` are `segment` and `word`, not `{g}`"),
            ));
        }
    }
    let words = granularities.contains(&"word");
    let segments = granularities.is_empty() || granularities.contains(&"segment");
    if words && format != Format::VerboseJson {
        return Err(ApiError::bad_request(
            "timestamp_granularities",
            "word timestamps need `response_format=verbose_json`",
        ));
    }
    let language = form.get("language").map(str::to_string);
    let speech = m.speech.unwrap_or(Speech::Whisper { multilingual: true });
    let prompt = form.get("prompt").map(str::trim).filter(|p| !p.is_empty());
    let prompt_ids = match (prompt, speech) {
        (None, _) => None,
        (Some(_), Speech::Ctc) => {
            return Err(ApiError::bad_request(
                "prompt",
                format!(
                    "`{}` is a CTC (wav2vec2) model, which cannot be given a `prompt`: leave it \
                     out",
                    m.id
                ),
            ))
        }
        (Some(p), Speech::Whisper { .. }) => Some(prompt_ids(m, p)?),
    };
    let language = match speech {
        Speech::Ctc => {
            if task == AudioTask::Translate {
                return Err(ApiError::bad_request(
                    "model",
                    format!(
                        "`{}` is a CTC (wav2vec2) model: it transcribes only; translation needs a \
                         multilingual Whisper model",
                        m.id
                    ),
                ));
            }
            if let Some(l) = &language {
                return Err(ApiError::bad_request(
                    "language",
                    format!(
                        "`{}` is a CTC (wav2vec2) model, which cannot be told a language (`{l}`): \
                         leave `language` out",
                        m.id
                    ),
                ));
            }
            if temperature > 0.0 {
                return Err(ApiError::bad_request(
                    "temperature",
                    format!(
                        "`{}` is a CTC (wav2vec2) model, which decodes greedily (the best token \
                         of each frame): only `temperature` 0 is supported",
                        m.id
                    ),
                ));
            }
            None
        }
        Speech::Whisper { multilingual } => {
            let code = match &language {
                None => None,
                Some(l) => Some(
                    ferroformers::pipelines::whisper_languages::code_of(l).ok_or_else(|| {
                        ApiError::bad_request(
                            "language",
                            format!(
                                "unknown language `{l}`: give an ISO-639-1 code (`en`) or a \
                                 name (`english`)"
                            ),
                        )
                    })?,
                ),
            };
            if multilingual {
                language
            } else {
                if task == AudioTask::Translate {
                    return Err(ApiError::bad_request(
                        "model",
                        format!(
                            "`{}` is an English-only Whisper model: it cannot translate",
                            m.id
                        ),
                    ));
                }
                // English is what an English-only model does anyway (the pipeline refuses the
                // parameter for such models, as transformers does).
                if let (Some(c), Some(l)) = (code, &language) {
                    if c != "en" {
                        return Err(ApiError::bad_request(
                            "language",
                            format!(
                                "`{}` is an English-only Whisper model: it cannot transcribe \
                                 `{l}`",
                                m.id
                            ),
                        ));
                    }
                }
                None
            }
        }
    };
    Ok(AudioRequest {
        format,
        temperature,
        words,
        segments,
        language,
        seed,
        prompt_ids,
    })
}

/// The pipeline parameters of a request over `duration` seconds of audio.
/// `words`: Whisper word timestamps (`return_timestamps="word"`) instead of segments.
fn speech_params(
    speech: Speech,
    req: &AudioRequest,
    task: AudioTask,
    duration: f64,
    words: bool,
) -> Params {
    let mut p = Params::new();
    match speech {
        Speech::Ctc => {
            if req.words {
                p.insert("return_timestamps".into(), json!("word"));
            }
        }
        Speech::Whisper { .. } => {
            if req.temperature > 0.0 {
                p.insert("temperature".into(), json!(req.temperature));
            } else {
                p.insert("num_beams".into(), json!(1));
            }
            if let Some(seed) = req.seed {
                p.insert("seed".into(), json!(seed));
            }
            if let Some(l) = &req.language {
                p.insert("language".into(), json!(l));
            }
            if task == AudioTask::Translate {
                p.insert("task".into(), json!("translate"));
            }
            if let Some(ids) = &req.prompt_ids {
                p.insert("generate_kwargs".into(), json!({ "prompt_ids": ids }));
            }
            // Segments need timestamps; so does Whisper's long-form decoding of audio over one
            // 30 s window (a margin for the resampled length). Words come from the alignment
            // heads' cross-attention (`return_timestamps="word"`).
            let segments = !matches!(req.format, Format::Json | Format::Text);
            if words {
                p.insert("return_timestamps".into(), json!("word"));
            } else if segments || duration > 29.9 {
                p.insert("return_timestamps".into(), json!(true));
            }
            // verbose_json segments carry their window's log-probability, compression ratio
            // and no-speech probability.
            if !words && req.format == Format::VerboseJson && req.segments {
                p.insert("return_window_stats".into(), json!(true));
            }
        }
    }
    p
}

/// A segment of the transcript in seconds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Segment {
    pub start: f64,
    pub end: f64,
    pub text: String,
}

/// Segments from the pipeline's output: Whisper's timestamped chunks (an open end closes at
/// the end of the audio), or one segment over the whole audio for a CTC model.
fn segments_of(speech: Speech, out: &Map<String, Value>, duration: f64) -> Vec<Segment> {
    let text = out.get("text").and_then(Value::as_str).unwrap_or("");
    if speech == Speech::Ctc {
        if text.is_empty() {
            return Vec::new();
        }
        return vec![Segment {
            start: 0.0,
            end: duration,
            text: text.to_string(),
        }];
    }
    let mut prev_end = 0.0;
    let mut out_segments = Vec::new();
    for c in out
        .get("chunks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let ts = c.get("timestamp");
        let at = |i: usize| ts.and_then(|t| t.get(i)).and_then(Value::as_f64);
        let start = at(0).unwrap_or(prev_end);
        let end = at(1).unwrap_or(duration.max(start));
        prev_end = end;
        out_segments.push(Segment {
            start,
            end,
            text: c
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        });
    }
    out_segments
}

/// The 30 s window (of the pipeline's `return_window_stats`) a segment starting at `start`
/// seconds came from: the last one starting at or before it.
fn window_of(out: &Map<String, Value>, start: f64) -> Option<&Map<String, Value>> {
    out.get("windows")?
        .as_array()?
        .iter()
        .filter_map(Value::as_object)
        .rfind(|w| {
            w.get("start")
                .and_then(Value::as_f64)
                .is_some_and(|t| t <= start + 1e-6)
        })
}

/// `HH:MM:SS,mmm` (SubRip, `sep` ',') or `HH:MM:SS.mmm` (WebVTT, `sep` '.').
pub(crate) fn timestamp(seconds: f64, sep: char) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}{sep}{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// Subtitles as Whisper's writers make them: numbered SubRip cues, or WebVTT; text trimmed,
/// `-->` inside it written `->`.
pub(crate) fn subtitles(segments: &[Segment], vtt: bool) -> String {
    let mut out = String::new();
    if vtt {
        out.push_str("WEBVTT\n\n");
    }
    for (i, s) in segments.iter().enumerate() {
        let sep = if vtt { '.' } else { ',' };
        if !vtt {
            out.push_str(&format!("{}\n", i + 1));
        }
        out.push_str(&format!(
            "{} --> {}\n{}\n\n",
            timestamp(s.start, sep),
            timestamp(s.end, sep),
            s.text.trim().replace("-->", "->")
        ));
    }
    out
}

async fn openai_audio(
    state: Arc<AppState>,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
    task: AudioTask,
) -> Result<Response, ApiError> {
    let form = read_form(&headers, form, state.payload_limit).await?;
    let file = form.file.clone().ok_or_else(|| {
        ApiError::bad_request(
            "file",
            "missing field `file`: the audio file (WAV, FLAC, MP3 or OGG) as a multipart file part",
        )
    })?;
    let m = speech_model(&state, form.get("model"))?;
    let speech = m.speech.unwrap_or(Speech::Whisper { multilingual: true });
    let index = index_of(&state, m);
    let req = audio_request(&form, m, task)?;
    let audio = tokio::task::spawn_blocking(move || ferroformers::audio::decode_bytes(&file))
        .await
        .map_err(ApiError::backend)?
        .map_err(|e| ApiError::bad_request("file", format!("cannot decode `file`: {e}")))?;
    if audio.samples.is_empty() || audio.sampling_rate == 0 {
        return Err(ApiError::bad_request(
            "file",
            "the audio file has no samples",
        ));
    }
    let duration = audio.duration_s();
    let input = Input::Audio {
        samples: audio.samples,
        sampling_rate: audio.sampling_rate,
    };
    // verbose_json's `language` when a multilingual Whisper model picks it.
    let detect = req.format == Format::VerboseJson
        && task == AudioTask::Transcribe
        && req.language.is_none()
        && speech == (Speech::Whisper { multilingual: true });
    let detected = if detect {
        let st = state.clone();
        let one = input.clone();
        tokio::task::spawn_blocking(move || st.models[index].pipe.spoken_languages(&[one]))
            .await
            .map_err(ApiError::backend)??
            .and_then(|mut l| l.pop())
    } else {
        None
    };
    // Whisper gives word or segment timestamps in one run, not both: with both asked, a second
    // run gives the segments (the same decoding, so the same text).
    let whisper_words = req.words && speech != Speech::Ctc;
    let first = transcribe(
        &state,
        index,
        input.clone(),
        speech_params(speech, &req, task, duration, whisper_words),
    )
    .await?;
    let (out, word_out) = if whisper_words && req.segments {
        let params = speech_params(speech, &req, task, duration, false);
        (transcribe(&state, index, input, params).await?, Some(first))
    } else if req.words {
        (first.clone(), Some(first))
    } else {
        (first, None)
    };
    let text = out
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let usage = json!({"type": "duration", "seconds": duration.ceil() as u64});
    let plain = |content_type: &'static str, body: String| {
        ([(header::CONTENT_TYPE, content_type)], body).into_response()
    };
    Ok(match req.format {
        Format::Json => axum::Json(json!({"text": text, "usage": usage})).into_response(),
        Format::Text => plain("text/plain; charset=utf-8", text),
        Format::Srt => plain(
            "text/plain; charset=utf-8",
            subtitles(&segments_of(speech, &out, duration), false),
        ),
        Format::Vtt => plain(
            "text/vtt; charset=utf-8",
            subtitles(&segments_of(speech, &out, duration), true),
        ),
        Format::VerboseJson => {
            let language = match (task, &req.language, speech) {
                (AudioTask::Translate, _, _) => Some("english"),
                (_, Some(l), _) => ferroformers::pipelines::whisper_languages::code_of(l)
                    .and_then(ferroformers::pipelines::whisper_languages::name_of),
                (
                    _,
                    None,
                    Speech::Whisper {
                        multilingual: false,
                    },
                ) => Some("english"),
                (_, None, Speech::Whisper { .. }) => detected.as_deref(),
                (_, None, Speech::Ctc) => None,
            };
            let mut o = Map::new();
            o.insert(
                "task".into(),
                json!(match task {
                    AudioTask::Transcribe => "transcribe",
                    AudioTask::Translate => "translate",
                }),
            );
            o.insert("language".into(), json!(language));
            o.insert("duration".into(), json!(duration));
            o.insert("text".into(), json!(text));
            if req.segments {
                let segs: Vec<Value> = segments_of(speech, &out, duration)
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let tokens: Vec<u32> = m
                            .tokenizer
                            .as_ref()
                            .and_then(|t| t.encode_with(&s.text, None, false).ok())
                            .map(|e| e.ids)
                            .unwrap_or_default();
                        let mut seg = json!({"id": i, "seek": 0, "start": s.start,
                               "end": s.end, "text": s.text, "tokens": tokens,
                               "temperature": req.temperature});
                        if let (Some(w), Value::Object(o)) = (window_of(&out, s.start), &mut seg) {
                            for key in [
                                "seek",
                                "temperature",
                                "avg_logprob",
                                "compression_ratio",
                                "no_speech_prob",
                            ] {
                                if let Some(v) = w.get(key) {
                                    o.insert(key.into(), v.clone());
                                }
                            }
                        }
                        seg
                    })
                    .collect();
                o.insert("segments".into(), Value::Array(segs));
            }
            if let Some(word_out) = &word_out {
                let words: Vec<Value> = word_out
                    .get("chunks")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        let at = |i: usize| c.get("timestamp").and_then(|t| t.get(i)).cloned();
                        json!({"word": c.get("text"), "start": at(0), "end": at(1)})
                    })
                    .collect();
                o.insert("words".into(), Value::Array(words));
            }
            o.insert("usage".into(), usage);
            axum::Json(Value::Object(o)).into_response()
        }
    })
}

/// One transcription through the model's queue: the pipeline's output map.
async fn transcribe(
    state: &Arc<AppState>,
    index: usize,
    input: Input,
    params: Params,
) -> Result<Map<String, Value>, ApiError> {
    let out = run(state, index, vec![input], params)
        .await
        .map_err(|mut e| {
            // Parameters the pipeline refused are the request's fault: OpenAI says 400.
            if e.status == StatusCode::UNPROCESSABLE_ENTITY {
                e.status = StatusCode::BAD_REQUEST;
            }
            e
        })?;
    match out.into_iter().next() {
        Some(Output::Speech(m)) => Ok(m),
        other => Err(ApiError::backend(format!(
            "the pipeline gave {other:?}, not a transcript"
        ))),
    }
}

pub(crate) async fn openai_transcriptions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    openai_audio(state, headers, form, AudioTask::Transcribe)
        .await
        .map_err(ApiError::openai)
}

pub(crate) async fn openai_translations(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    openai_audio(state, headers, form, AudioTask::Translate)
        .await
        .map_err(ApiError::openai)
}

/// A body of audio bytes (`audio/*`, `application/octet-stream`) rather than JSON.
pub(crate) fn is_audio_body(headers: &HeaderMap) -> bool {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    ct.starts_with("audio/") || ct.starts_with("application/octet-stream")
}

/// HF Inference API `inputs` for a speech model: base64 audio (also as a `data:` URL), a
/// `{raw | array, sampling_rate}` waveform, or a list of those (`true` when it was a list).
/// A string is never read as a path on the server.
pub(crate) fn speech_inputs(v: Option<&Value>, max: usize) -> Result<(Vec<Input>, bool), ApiError> {
    let (items, many) = input_items(v, max)?;
    let inputs = items
        .iter()
        .enumerate()
        .map(|(i, x)| match x {
            Value::String(s) => {
                let b64 = match s.split_once(";base64,") {
                    Some((head, rest)) if head.starts_with("data:") => rest,
                    _ => s.as_str(),
                };
                base64_decode(b64).map(Input::AudioBytes).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!(
                            "inputs #{i}: a string input to a speech model must be base64-encoded \
                             audio (or send the file's bytes as the body with Content-Type \
                             audio/*)"
                        ),
                    )
                })
            }
            other => Input::from_json(other, i).map_err(ApiError::from),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((inputs, many))
}

/// Standard or URL-safe base64, padding optional, whitespace ignored; `None` when it is not
/// base64.
pub(crate) fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut n = 0u32;
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut padding = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => {
                padding += 1;
                continue;
            }
            b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return None,
        };
        if padding > 0 {
            return None;
        }
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    // A lone character left over (6 bits) cannot end base64.
    (n < 6 && padding <= 2).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtitles_and_timestamps() {
        assert_eq!(timestamp(3725.0456, ','), "01:02:05,046");
        assert_eq!(timestamp(0.0, '.'), "00:00:00.000");
        let segs = vec![
            Segment {
                start: 0.0,
                end: 1.5,
                text: " Hello -->".into(),
            },
            Segment {
                start: 1.5,
                end: 62.25,
                text: " world".into(),
            },
        ];
        assert_eq!(
            subtitles(&segs, false),
            "1\n00:00:00,000 --> 00:00:01,500\nHello ->\n\n\
             2\n00:00:01,500 --> 00:01:02,250\nworld\n\n"
        );
        assert_eq!(
            subtitles(&segs, true),
            "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello ->\n\n\
             00:00:01.500 --> 00:01:02.250\nworld\n\n"
        );
        assert_eq!(subtitles(&[], true), "WEBVTT\n\n");
    }

    #[test]
    fn base64_round_trips() {
        for data in [&b""[..], b"M", b"Ma", b"Man", b"\x00\xff\x10 audio bytes"] {
            let enc = base64_encode(data);
            assert_eq!(base64_decode(&enc).as_deref(), Some(data), "{enc}");
            assert_eq!(
                base64_decode(enc.trim_end_matches('=')).as_deref(),
                Some(data)
            );
        }
        assert_eq!(
            base64_decode("TW-_").unwrap(),
            base64_decode("TW+/").unwrap()
        );
        assert!(base64_decode("/etc/passwd!").is_none());
        assert!(base64_decode("TWFuT").is_none());
        assert!(base64_decode("TQ==TQ==").is_none());
    }

    #[test]
    fn whisper_chunks_become_segments() {
        let out: Map<String, Value> = serde_json::from_value(json!({
            "text": " a b",
            "chunks": [{"timestamp": [0.0, 1.2], "text": " a"},
                       {"timestamp": [1.2, null], "text": " b"}]
        }))
        .unwrap();
        let w = Speech::Whisper { multilingual: true };
        let s = segments_of(w, &out, 4.0);
        assert_eq!(s.len(), 2);
        assert_eq!((s[1].start, s[1].end, s[1].text.as_str()), (1.2, 4.0, " b"));
        let c = segments_of(Speech::Ctc, &out, 4.0);
        assert_eq!(
            (c[0].start, c[0].end, c[0].text.as_str()),
            (0.0, 4.0, " a b")
        );
    }
}
