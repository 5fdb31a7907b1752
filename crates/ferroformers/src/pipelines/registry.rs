//! Task names, aliases and default models (Hugging Face transformers v4.5x defaults).

use super::feature_extraction::FeatureExtraction;
use super::fill_mask::FillMask;
use super::question_answering::QuestionAnswering;
use super::text_classification::TextClassification;
use super::text_generation::TextGeneration;
use super::token_classification::TokenClassification;
use super::{Pipeline, PipelineOptions, Task};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub struct TaskInfo {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub default_model: &'static str,
    /// The revision HF pins for its default.
    pub default_revision: &'static str,
    pub implemented: bool,
}

pub const TASKS: &[TaskInfo] = &[
    TaskInfo {
        name: "text-classification",
        aliases: &["sentiment-analysis"],
        default_model: "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
        default_revision: "714eb0f",
        implemented: true,
    },
    TaskInfo {
        name: "fill-mask",
        aliases: &[],
        default_model: "distilbert/distilroberta-base",
        default_revision: "fb53ab8",
        implemented: true,
    },
    TaskInfo {
        name: "feature-extraction",
        aliases: &[],
        default_model: "distilbert/distilbert-base-cased",
        default_revision: "6ea8117",
        implemented: true,
    },
    TaskInfo {
        name: "sentence-embeddings",
        aliases: &[],
        default_model: "sentence-transformers/all-MiniLM-L6-v2",
        default_revision: "main",
        implemented: true,
    },
    TaskInfo {
        name: "sentence-similarity",
        aliases: &[],
        default_model: "sentence-transformers/all-MiniLM-L6-v2",
        default_revision: "main",
        implemented: true,
    },
    TaskInfo {
        name: "token-classification",
        aliases: &["ner"],
        default_model: "dbmdz/bert-large-cased-finetuned-conll03-english",
        default_revision: "4c53496",
        implemented: true,
    },
    TaskInfo {
        name: "question-answering",
        aliases: &[],
        default_model: "distilbert/distilbert-base-cased-distilled-squad",
        default_revision: "564e9b5",
        implemented: true,
    },
    TaskInfo {
        name: "text-generation",
        aliases: &[],
        default_model: "openai-community/gpt2",
        default_revision: "607a30d",
        implemented: true,
    },
    TaskInfo {
        name: "text2text-generation",
        aliases: &[],
        default_model: "google-t5/t5-base",
        default_revision: "686f1db",
        implemented: true,
    },
    TaskInfo {
        name: "summarization",
        aliases: &[],
        default_model: "sshleifer/distilbart-cnn-12-6",
        default_revision: "a4f8f3e",
        implemented: true,
    },
    TaskInfo {
        name: "translation",
        aliases: &[],
        default_model: "google-t5/t5-base",
        default_revision: "686f1db",
        implemented: true,
    },
    TaskInfo {
        name: "automatic-speech-recognition",
        aliases: &[],
        default_model: "facebook/wav2vec2-base-960h",
        default_revision: "22aad52",
        implemented: true,
    },
    TaskInfo {
        name: "zero-shot-classification",
        aliases: &[],
        default_model: "facebook/bart-large-mnli",
        default_revision: "d7645e1",
        implemented: true,
    },
];

/// Find a task by name or alias.
pub fn lookup(task: &str) -> Result<&'static TaskInfo> {
    // `translation_XX_to_YY` is the translation task for one language pair.
    let task = if super::text2text::translation_pair(task).is_some() {
        "translation"
    } else {
        task
    };
    TASKS
        .iter()
        .find(|t| t.name == task || t.aliases.contains(&task))
        .ok_or_else(|| Error::UnknownTask {
            task: task.to_string(),
            note: String::new(),
            known: TASKS
                .iter()
                .filter(|t| t.implemented)
                .flat_map(|t| std::iter::once(t.name).chain(t.aliases.iter().copied()))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Build the pipeline for `task` with `opts`.
pub fn build(task: &str, opts: &PipelineOptions) -> Result<Pipeline> {
    let info = lookup(task)?;
    if !info.implemented {
        return Err(Error::UnknownTask {
            task: task.to_string(),
            note: "known to HF, not implemented in ferroformers yet".into(),
            known: TASKS
                .iter()
                .filter(|t| t.implemented)
                .map(|t| t.name)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    // The task default comes at the revision HF pins for it; a model given by the caller at
    // the caller's revision (or `main`).
    let pinned;
    let opts = if opts.model.is_none() && opts.revision.is_none() {
        pinned = PipelineOptions {
            revision: Some(info.default_revision.to_string()),
            ..opts.clone()
        };
        &pinned
    } else {
        opts
    };
    let model = opts.model.as_deref().unwrap_or(info.default_model);
    // `translation_XX_to_YY` keeps its language pair; aliases become the canonical name.
    let task_name = if info.name == "translation" {
        task
    } else {
        info.name
    };
    let inner: Box<dyn Task> = match info.name {
        "text-classification" => Box::new(TextClassification::load(opts, model)?),
        "fill-mask" => Box::new(FillMask::load(opts, model)?),
        "feature-extraction" => Box::new(FeatureExtraction::load(opts, model, false)?),
        "sentence-embeddings" => Box::new(FeatureExtraction::load(opts, model, true)?),
        "sentence-similarity" => Box::new(super::feature_extraction::SentenceSimilarity::load(
            opts, model,
        )?),
        "token-classification" => Box::new(TokenClassification::load(opts, model)?),
        "question-answering" => Box::new(QuestionAnswering::load(opts, model)?),
        "zero-shot-classification" => Box::new(super::zero_shot::ZeroShot::load(opts, model)?),
        "text-generation" => Box::new(TextGeneration::load(opts, model)?),
        "automatic-speech-recognition" => {
            super::automatic_speech_recognition::load_task(opts, model)?
        }
        "text2text-generation" | "summarization" | "translation" => {
            Box::new(super::text2text::Text2Text::load(opts, model, task_name)?)
        }
        other => unreachable!("task `{other}` is marked implemented but has no builder"),
    };
    Ok(Pipeline::new(info.name, opts.batch_size, inner))
}

/// Whether the model at `path` is a GGUF file (the file itself, or the only one in a folder
/// without config.json): the models `PipelineOptions::gguf_math` applies to.
pub fn is_gguf(path: &std::path::Path) -> bool {
    crate::generation::gguf_file(path).is_some()
}

/// The task a model folder was made for: its config's `architectures`, a sentence-transformers
/// folder, a GGUF file.
pub fn infer_task(dir: &std::path::Path) -> Option<&'static str> {
    if dir.join("modules.json").is_file() {
        return Some("sentence-embeddings");
    }
    if dir.is_file() && dir.extension().is_some_and(|e| e == "gguf") {
        return Some("text-generation");
    }
    if crate::models::whisper::is_ct2_dir(dir) {
        return Some("automatic-speech-recognition");
    }
    let cfg = crate::config::ModelConfig::from_dir(dir).ok()?.raw;
    let arch = cfg
        .get("architectures")?
        .as_array()?
        .first()?
        .as_str()?
        .to_string();
    if arch.ends_with("ForCausalLM") || arch.ends_with("LMHeadModel") {
        return Some("text-generation");
    }
    if arch == "WhisperForConditionalGeneration" || arch.ends_with("ForCTC") {
        return Some("automatic-speech-recognition");
    }
    if arch.ends_with("ForConditionalGeneration") || arch.ends_with("MTModel") {
        return Some("text2text-generation");
    }
    // Encoder heads as the library reads them from `architectures`.
    use crate::models::Head;
    Some(
        match Head::from_architectures(std::slice::from_ref(&arch)) {
            Head::SequenceClassification => "text-classification",
            Head::TokenClassification => "token-classification",
            Head::QuestionAnswering => "question-answering",
            Head::MaskedLm => "fill-mask",
            Head::Base if arch.ends_with("Model") => "feature-extraction",
            Head::Base => return None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_resolve() {
        for t in TASKS {
            assert_eq!(lookup(t.name).unwrap().name, t.name);
            for a in t.aliases {
                assert_eq!(lookup(a).unwrap().name, t.name);
            }
        }
        let err = lookup("sentiment").unwrap_err().to_string();
        assert!(err.contains("unknown task `sentiment`"), "{err}");
    }

    #[test]
    fn tasks_come_from_the_model_files() {
        let fix = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        for (dir, want) in [
            ("models/bert-seqcls", Some("text-classification")),
            ("models/bert-tokcls", Some("token-classification")),
            ("models/bert-qa", Some("question-answering")),
            ("models/bert-mlm", Some("fill-mask")),
            ("models/bert-base", Some("feature-extraction")),
            ("models/minilm-st", Some("sentence-embeddings")),
            ("decoders/models/llama", Some("text-generation")),
            ("decoders/models/bloom", Some("text-generation")),
            ("seq2seq/models/t5", Some("text2text-generation")),
            ("models/no-config", None),
            (
                "wav2vec2/models/w2v-group",
                Some("automatic-speech-recognition"),
            ),
        ] {
            assert_eq!(infer_task(&fix.join(dir)), want, "{dir}");
        }
    }
}
