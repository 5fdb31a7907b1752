//! `ferroformers train TASK ...`: HF `TrainingArguments` names on the command line, a thin
//! layer over `ferroformers::train::Trainer`.

use std::io::Write;

use clap::Args;
use std::path::{Path, PathBuf};

use ferroformers::train::data::Columns;
use ferroformers::train::optim::Schedule;
use ferroformers::train::{EvalStrategy, Event, Task, Trainer, TrainingArguments};

/// `ferroformers train TASK ...`: HF `TrainingArguments`' names; an option not given keeps
/// `TrainingArguments`' default.
#[derive(Args)]
pub struct TrainArgs {
    /// text-classification (or sentiment-analysis), token-classification (or ner), or
    /// question-answering.
    #[arg(value_name = "TASK", value_parser = task)]
    task: Task,
    /// The base model: a folder or hub id.
    #[arg(long, value_name = "PATH|ID")]
    model: String,
    /// Training data: JSONL, CSV or SQuAD JSON.
    #[arg(long, visible_alias = "train-file", value_name = "FILE")]
    train: PathBuf,
    /// Evaluation data, in the same form.
    #[arg(long, visible_aliases = ["eval-file", "validation-file"], value_name = "FILE")]
    eval: Option<PathBuf>,
    /// Where the model (and checkpoints) are saved.
    #[arg(long, visible_alias = "output-dir", value_name = "DIR")]
    output: PathBuf,
    /// [default: 5e-5]
    #[arg(long, allow_negative_numbers = true)]
    learning_rate: Option<f64>,
    /// [default: 3]
    #[arg(long, allow_negative_numbers = true)]
    num_train_epochs: Option<f64>,
    /// Stop after this many optimizer steps (overrides the epochs); 0 or below (HF's default
    /// -1) trains --num-train-epochs.
    #[arg(long, allow_negative_numbers = true)]
    max_steps: Option<i64>,
    /// [default: 8]
    #[arg(long, allow_negative_numbers = true)]
    per_device_train_batch_size: Option<usize>,
    /// [default: 8]
    #[arg(long, allow_negative_numbers = true)]
    per_device_eval_batch_size: Option<usize>,
    /// [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    weight_decay: Option<f64>,
    /// [default: 0.9]
    #[arg(long, allow_negative_numbers = true)]
    adam_beta1: Option<f64>,
    /// [default: 0.999]
    #[arg(long, allow_negative_numbers = true)]
    adam_beta2: Option<f64>,
    /// [default: 1e-8]
    #[arg(long, allow_negative_numbers = true)]
    adam_epsilon: Option<f64>,
    /// [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    warmup_ratio: Option<f64>,
    /// [default: 0]
    #[arg(long, allow_negative_numbers = true)]
    warmup_steps: Option<usize>,
    /// [default: 1]
    #[arg(long, allow_negative_numbers = true)]
    gradient_accumulation_steps: Option<usize>,
    /// linear (default), cosine, constant or constant_with_warmup.
    #[arg(long, value_name = "SCHEDULE", value_parser = schedule)]
    lr_scheduler_type: Option<Schedule>,
    /// [default: 1]
    #[arg(long, allow_negative_numbers = true)]
    max_grad_norm: Option<f64>,
    /// [default: 42]
    #[arg(long, allow_negative_numbers = true)]
    seed: Option<u64>,
    /// Tokens per example (128; token-classification: the model's; question-answering: 384).
    #[arg(long, visible_alias = "max-seq-length", allow_negative_numbers = true)]
    max_length: Option<usize>,
    /// When to evaluate: epoch (default with --eval), steps or no.
    #[arg(long, value_name = "STRATEGY", value_parser = strategy)]
    eval_strategy: Option<EvalStrategy>,
    /// [default: 500]
    #[arg(long, allow_negative_numbers = true)]
    eval_steps: Option<usize>,
    /// [default: 500]
    #[arg(long, allow_negative_numbers = true)]
    logging_steps: Option<usize>,
    /// When to save checkpoints: steps (default), epoch or no.
    #[arg(long, value_name = "STRATEGY", value_parser = strategy)]
    save_strategy: Option<EvalStrategy>,
    /// [default: 500]
    #[arg(long, allow_negative_numbers = true)]
    save_steps: Option<usize>,
    /// Keep at most this many checkpoints.
    #[arg(long, allow_negative_numbers = true)]
    save_total_limit: Option<usize>,
    /// A checkpoint folder, or `last` for the newest in --output.
    #[arg(long, value_name = "DIR|last")]
    resume_from_checkpoint: Option<String>,
    /// Load the best checkpoint (by --metric-for-best-model) when training ends.
    #[arg(long)]
    load_best_model_at_end: bool,
    /// loss, accuracy, f1, mse, precision, recall or exact_match.
    #[arg(long, value_name = "METRIC")]
    metric_for_best_model: Option<String>,
    /// Whether a larger --metric-for-best-model is better (default: false for loss and mse).
    #[arg(long, value_name = "BOOL", value_parser = boolean)]
    greater_is_better: Option<bool>,
    /// Replace a head whose shape does not fit the data's labels.
    #[arg(long)]
    ignore_mismatched_sizes: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// Threads for the arithmetic (1 to 1024).
    #[arg(long, value_name = "N", value_parser = crate::threads, allow_negative_numbers = true)]
    threads: Option<u64>,
    /// The column of the texts (text-classification: text; token-classification: tokens;
    /// question-answering: question).
    #[arg(long, visible_alias = "question-column", value_name = "COLUMN")]
    text_column: Option<String>,
    /// text-classification: a second text per example; question-answering: the context
    /// (default: context).
    #[arg(long, visible_alias = "context-column", value_name = "COLUMN")]
    text_pair_column: Option<String>,
    /// The labels (text-classification: label; token-classification: ner_tags;
    /// question-answering: answers).
    #[arg(long, visible_alias = "answer-column", value_name = "COLUMN")]
    label_column: Option<String>,
    /// token-classification: label every sub-token of a word, not only its first.
    #[arg(long)]
    label_all_tokens: bool,
    /// question-answering: overlap of the windows of a long context [default: 128].
    #[arg(long, allow_negative_numbers = true)]
    doc_stride: Option<usize>,
    /// question-answering: candidates per window in evaluation [default: 20].
    #[arg(long, allow_negative_numbers = true)]
    n_best_size: Option<usize>,
    /// question-answering: longest answer in tokens [default: 30].
    #[arg(long, allow_negative_numbers = true)]
    max_answer_length: Option<usize>,
}

fn task(v: &str) -> Result<Task, String> {
    Task::parse(v).ok_or_else(|| {
        "training supports text-classification, token-classification and question-answering"
            .to_string()
    })
}

fn schedule(v: &str) -> Result<Schedule, String> {
    Schedule::parse(v)
        .ok_or_else(|| "expected linear, cosine, constant or constant_with_warmup".to_string())
}

fn strategy(v: &str) -> Result<EvalStrategy, String> {
    EvalStrategy::parse(v).ok_or_else(|| "expected epoch, steps or no".to_string())
}

fn boolean(v: &str) -> Result<bool, String> {
    match v {
        "true" | "True" => Ok(true),
        "false" | "False" => Ok(false),
        _ => Err("expected true or false".to_string()),
    }
}

impl TrainArgs {
    /// The arguments given, over `TrainingArguments`' defaults.
    fn training_arguments(&self) -> TrainingArguments {
        let mut ta = TrainingArguments {
            columns: Columns::for_task(self.task),
            output_dir: self.output.clone(),
            ..TrainingArguments::default()
        };
        fn set<T: Clone>(field: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *field = v.clone();
            }
        }
        set(&mut ta.learning_rate, &self.learning_rate);
        set(&mut ta.num_train_epochs, &self.num_train_epochs);
        set(
            &mut ta.per_device_train_batch_size,
            &self.per_device_train_batch_size,
        );
        set(
            &mut ta.per_device_eval_batch_size,
            &self.per_device_eval_batch_size,
        );
        set(&mut ta.weight_decay, &self.weight_decay);
        set(&mut ta.adam_beta1, &self.adam_beta1);
        set(&mut ta.adam_beta2, &self.adam_beta2);
        set(&mut ta.adam_epsilon, &self.adam_epsilon);
        set(&mut ta.warmup_ratio, &self.warmup_ratio);
        set(&mut ta.warmup_steps, &self.warmup_steps);
        set(
            &mut ta.gradient_accumulation_steps,
            &self.gradient_accumulation_steps,
        );
        set(&mut ta.lr_scheduler_type, &self.lr_scheduler_type);
        set(&mut ta.max_grad_norm, &self.max_grad_norm);
        set(&mut ta.seed, &self.seed);
        set(&mut ta.eval_steps, &self.eval_steps);
        set(&mut ta.logging_steps, &self.logging_steps);
        set(&mut ta.save_strategy, &self.save_strategy);
        set(&mut ta.save_steps, &self.save_steps);
        set(&mut ta.doc_stride, &self.doc_stride);
        set(&mut ta.n_best_size, &self.n_best_size);
        set(&mut ta.max_answer_length, &self.max_answer_length);
        set(&mut ta.device, &self.device);
        set(&mut ta.columns.text, &self.text_column);
        set(&mut ta.columns.label, &self.label_column);
        if let Some(m) = self.max_steps {
            // HF: max_steps <= 0 means "train num_train_epochs".
            ta.max_steps = usize::try_from(m).ok().filter(|&m| m > 0);
        }
        ta.max_length = self.max_length.or(ta.max_length);
        ta.eval_strategy = self.eval_strategy.or(ta.eval_strategy);
        ta.save_total_limit = self.save_total_limit.or(ta.save_total_limit);
        ta.metric_for_best_model = self
            .metric_for_best_model
            .clone()
            .or(ta.metric_for_best_model);
        ta.greater_is_better = self.greater_is_better.or(ta.greater_is_better);
        ta.columns.text_pair = self.text_pair_column.clone().or(ta.columns.text_pair);
        ta.label_all_tokens |= self.label_all_tokens;
        ta.load_best_model_at_end |= self.load_best_model_at_end;
        ta.ignore_mismatched_sizes |= self.ignore_mismatched_sizes;
        ta
    }
}

/// candle's own worker threads (its barrier pool, for elementwise ops) spin after each op
/// while rayon's threads run the products and attention: three busy threads on two cores
/// (measured: 56-59 samples/s, 61-62 with `CANDLE_NUM_THREADS=1`, MiniLM token
/// classification on 2 threads). The trainer's heavy ops are its own and use rayon, so candle
/// gets one thread unless the environment says otherwise.
fn one_candle_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// The newest `checkpoint-N` folder in `output` (`--resume-from-checkpoint last`).
fn last_checkpoint(output: &std::path::Path) -> Result<PathBuf, String> {
    ferroformers::train::checkpoints(output)
        .map_err(|e| e.to_string())?
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| format!("no checkpoint-N folder in `{}`", output.display()))
}

/// Checks that `--output` can take the model before anything loads or trains (a file there,
/// or a folder that cannot be made or written in, only failed when saving, after the whole
/// training): it is an existing folder or is made now, and a file can be written in it.
/// Returns whether the folder was made here.
fn check_output(output: &Path) -> Result<bool, String> {
    let name = output.display();
    if output.exists() && !output.is_dir() {
        return Err(format!(
            "--output `{name}` is a file; it names the folder to save the model in"
        ));
    }
    let made = !output.exists();
    std::fs::create_dir_all(output)
        .map_err(|e| format!("--output `{name}`: cannot create the folder: {e}"))?;
    let probe = output.join(format!(".ferroformers-write-check-{}", std::process::id()));
    if let Err(e) = std::fs::write(&probe, b"").and_then(|()| std::fs::remove_file(&probe)) {
        if made {
            let _ = std::fs::remove_dir(output);
        }
        return Err(format!(
            "--output `{name}`: cannot write in the folder: {e}"
        ));
    }
    Ok(made)
}

/// A library error as the command line says it: a `TrainingArguments` field that is one of
/// `train`'s options is named by its option (`--per-device-eval-batch-size`, not
/// `per_device_eval_batch_size`).
fn cli_error(e: ferroformers::Error) -> String {
    use clap::CommandFactory;
    if let ferroformers::Error::InvalidParameter { name, detail } = &e {
        let flag = name.replace('_', "-");
        let cli = crate::Cli::command();
        let options: Vec<String> = cli
            .find_subcommand("train")
            .map(|t| {
                t.get_arguments()
                    .filter_map(|a| a.get_long().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if options.contains(&flag) {
            // Other fields the message names are options too (`save_steps 100 must be a
            // multiple of eval_steps 30`).
            let mut detail = detail.clone();
            for o in options.iter().filter(|o| o.contains('-')) {
                detail = replace_word(&detail, &o.replace('-', "_"), &format!("--{o}"));
            }
            return format!("invalid value for --{flag}: {detail}");
        }
    }
    e.to_string()
}

/// `text` with every whole-word `word` (not inside a longer name) replaced by `with`.
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(word) {
        let before = rest[..i].chars().next_back();
        let after = rest[i + word.len()..].chars().next();
        out.push_str(&rest[..i]);
        if before.is_some_and(is_name) || after.is_some_and(is_name) {
            out.push_str(word);
        } else {
            out.push_str(with);
        }
        rest = &rest[i + word.len()..];
    }
    out.push_str(rest);
    out
}

/// Train, save; progress on stderr.
pub fn train(a: TrainArgs) -> Result<(), String> {
    let output = a.output.clone();
    let made = check_output(&output)?;
    let result = train_and_save(a);
    if result.is_err() && made {
        // The folder made by check_output, unless something was saved in it (remove_dir
        // removes only an empty folder).
        let _ = std::fs::remove_dir(&output);
    }
    result
}

fn train_and_save(a: TrainArgs) -> Result<(), String> {
    if let Some(n) = a.threads {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let ta = a.training_arguments();
    let (model, output, resume) = (&a.model, &a.output, a.resume_from_checkpoint.clone());
    crate::keep_freed_memory();
    one_candle_thread();
    let mut trainer =
        Trainer::for_task(a.task, model, &a.train, a.eval.as_deref(), ta).map_err(cli_error)?;
    for w in &trainer.warnings {
        eprintln!("warning: {w}");
    }
    // Hidden when stderr is not a terminal; log lines go through the bar so they do not
    // tear it.
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("a valid template")
        .progress_chars("##-"),
    );
    let mut err = std::io::stderr();
    let mut on_event = |e: Event| match e {
        Event::Start {
            examples,
            total_steps,
            parameters,
            fresh,
        } => {
            if !fresh.is_empty() {
                let _ = writeln!(
                    err,
                    "Some weights were not in {model} and are newly initialized: [{}]",
                    fresh.join(", ")
                );
            }
            let _ = writeln!(
                err,
                "training on {examples} examples, {total_steps} steps, {parameters} parameters"
            );
            bar.set_length(total_steps as u64);
        }
        Event::Step {
            step,
            epoch,
            loss,
            learning_rate,
            samples_per_second,
            ..
        } => {
            bar.set_position(step as u64);
            bar.set_message(format!(
                "epoch {epoch:.2} loss {loss:.4} lr {learning_rate:.3e} {samples_per_second:.1} samples/s"
            ));
        }
        Event::Log(v) => {
            if bar.is_hidden() {
                let _ = writeln!(err, "{v}");
            } else {
                bar.println(v.to_string());
            }
        }
    };
    if let Some(r) = resume {
        let dir = if r == "last" || r == "true" {
            last_checkpoint(output)?
        } else {
            PathBuf::from(r)
        };
        trainer.resume_from_checkpoint(&dir).map_err(cli_error)?;
        eprintln!("resuming from {}", dir.display());
    }
    trainer.train(&mut on_event).map_err(cli_error)?;
    bar.finish();
    trainer.save(output).map_err(|e| e.to_string())?;
    eprintln!("saved to {}", output.display());
    Ok(())
}
