//! `ferroformers train TASK ...`: HF `TrainingArguments` names on the command line, a thin
//! layer over `ferroformers::train::Trainer`.

use std::io::Write;
use std::path::PathBuf;

use ferroformers::train::data::Columns;
use ferroformers::train::optim::Schedule;
use ferroformers::train::{EvalStrategy, Event, Task, Trainer, TrainingArguments};

pub const USAGE: &str = "\
  ferroformers train TASK --model PATH|ID --train FILE [--eval FILE] --output DIR
    TASK: text-classification, token-classification or question-answering
                        [--learning-rate 5e-5] [--num-train-epochs 3] [--max-steps N]
                        [--per-device-train-batch-size 8] [--per-device-eval-batch-size 8]
                        [--weight-decay 0] [--warmup-ratio 0] [--warmup-steps 0]
                        [--gradient-accumulation-steps 1]
                        [--lr-scheduler-type linear|cosine|constant|constant_with_warmup]
                        [--max-grad-norm 1] [--seed 42]
                        [--max-length N (128; token-classification: the model's; QA: 384)]
                        [--eval-strategy epoch|steps|no] [--eval-steps 500] [--logging-steps 500]
                        [--save-strategy steps|epoch|no] [--save-steps 500] [--save-total-limit N]
                        [--resume-from-checkpoint DIR|last] [--load-best-model-at-end]
                        [--metric-for-best-model loss|accuracy|f1|mse|precision|recall|exact_match]
                        [--greater-is-better B] [--ignore-mismatched-sizes] [--threads N]
                        [--device cpu|cuda|cuda:N]
    text-classification:  [--text-column text] [--text-pair-column COL] [--label-column label]
    token-classification: [--text-column tokens] [--label-column ner_tags] [--label-all-tokens]
    question-answering:   [--question-column question] [--context-column context]
                          [--answer-column answers] [--doc-stride 128] [--n-best-size 20]
                          [--max-answer-length 30]";

/// An option's numeric value, or an error naming the option.
pub(crate) fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("`{name}` takes a number, not `{v}`"))
}

/// mimalloc's `purge_delay` option (15 in its `mi_option_e`): -1 keeps freed pages instead of
/// returning them to the kernel. Every training step allocates and frees each gradient and
/// activation again; purged pages come back through page faults (~12% of a MiniLM step:
/// 35.4-35.9 against 39.6-40.5 samples/s with `MIMALLOC_PURGE_DELAY=-1`, same run). An explicit
/// `MIMALLOC_PURGE_DELAY` in the environment wins.
fn keep_freed_memory() {
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is thread-safe in mimalloc; 15 is purge_delay.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
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

/// Parse the options, train, save; progress on stderr.
pub fn train(args: &[String]) -> Result<(), String> {
    let mut it = args.iter();
    let task = it
        .next()
        .ok_or_else(|| format!("`train` needs a TASK\nusage:\n{USAGE}"))?;
    if task == "--help" || task == "-h" {
        println!("usage:\n{USAGE}");
        return Ok(());
    }
    let task = Task::parse(task).ok_or_else(|| {
        format!(
            "training supports text-classification, token-classification and \
             question-answering, not `{task}`"
        )
    })?;
    let (mut model, mut train_file, mut eval_file) = (None, None, None);
    let mut ta = TrainingArguments {
        columns: Columns::for_task(task),
        ..TrainingArguments::default()
    };
    let mut output = None;
    let mut resume: Option<String> = None;
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("`{a}` needs a value"))
        };
        match a.as_str() {
            "--model" => model = Some(value()?),
            "--train" | "--train-file" => train_file = Some(PathBuf::from(value()?)),
            "--eval" | "--eval-file" | "--validation-file" => {
                eval_file = Some(PathBuf::from(value()?))
            }
            "--output" | "--output-dir" => output = Some(PathBuf::from(value()?)),
            "--learning-rate" => ta.learning_rate = num(a, &value()?)?,
            "--num-train-epochs" => ta.num_train_epochs = num(a, &value()?)?,
            "--max-steps" => ta.max_steps = Some(num(a, &value()?)?),
            "--per-device-train-batch-size" => ta.per_device_train_batch_size = num(a, &value()?)?,
            "--per-device-eval-batch-size" => ta.per_device_eval_batch_size = num(a, &value()?)?,
            "--weight-decay" => ta.weight_decay = num(a, &value()?)?,
            "--gradient-accumulation-steps" => ta.gradient_accumulation_steps = num(a, &value()?)?,
            "--warmup-ratio" => ta.warmup_ratio = num(a, &value()?)?,
            "--warmup-steps" => ta.warmup_steps = num(a, &value()?)?,
            "--lr-scheduler-type" => {
                let v = value()?;
                ta.lr_scheduler_type = Schedule::parse(&v).ok_or_else(|| {
                    format!(
                        "unknown scheduler `{v}` (linear, cosine, constant, constant_with_warmup)"
                    )
                })?
            }
            "--max-grad-norm" => ta.max_grad_norm = num(a, &value()?)?,
            "--seed" => ta.seed = num(a, &value()?)?,
            "--max-length" | "--max-seq-length" => ta.max_length = Some(num(a, &value()?)?),
            "--doc-stride" => ta.doc_stride = num(a, &value()?)?,
            "--n-best-size" => ta.n_best_size = num(a, &value()?)?,
            "--max-answer-length" => ta.max_answer_length = num(a, &value()?)?,
            "--label-all-tokens" => ta.label_all_tokens = true,
            "--eval-strategy" => {
                let v = value()?;
                ta.eval_strategy = Some(
                    EvalStrategy::parse(&v)
                        .ok_or_else(|| format!("unknown eval strategy `{v}` (epoch, steps, no)"))?,
                )
            }
            "--eval-steps" => ta.eval_steps = num(a, &value()?)?,
            "--logging-steps" => ta.logging_steps = num(a, &value()?)?,
            "--save-strategy" => {
                let v = value()?;
                ta.save_strategy = EvalStrategy::parse(&v)
                    .ok_or_else(|| format!("unknown save strategy `{v}` (steps, epoch, no)"))?
            }
            "--save-steps" => ta.save_steps = num(a, &value()?)?,
            "--save-total-limit" => ta.save_total_limit = Some(num(a, &value()?)?),
            "--resume-from-checkpoint" => resume = Some(value()?),
            "--load-best-model-at-end" => ta.load_best_model_at_end = true,
            "--metric-for-best-model" => ta.metric_for_best_model = Some(value()?),
            "--greater-is-better" => {
                let v = value()?;
                ta.greater_is_better = Some(match v.as_str() {
                    "true" | "True" => true,
                    "false" | "False" => false,
                    _ => {
                        return Err(format!(
                            "`--greater-is-better` takes true or false, not `{v}`"
                        ))
                    }
                })
            }
            "--text-column" | "--question-column" => ta.columns.text = value()?,
            "--text-pair-column" | "--context-column" => ta.columns.text_pair = Some(value()?),
            "--label-column" | "--answer-column" => ta.columns.label = value()?,
            "--ignore-mismatched-sizes" => ta.ignore_mismatched_sizes = true,
            "--device" => ta.device = value()?,
            "--threads" => {
                let n: usize = num(a, &value()?)?;
                std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            }
            s => return Err(format!("unknown option `{s}` for `train`\nusage:\n{USAGE}")),
        }
    }
    let model = model.ok_or("`train` needs --model (a base model folder or hub id)")?;
    let train_file = train_file.ok_or("`train` needs --train FILE (JSONL, CSV or SQuAD JSON)")?;
    let output = output.ok_or("`train` needs --output DIR (where the model is saved)")?;
    ta.output_dir = output.clone();
    keep_freed_memory();
    one_candle_thread();
    let mut trainer = Trainer::for_task(task, &model, &train_file, eval_file.as_deref(), ta)
        .map_err(|e| e.to_string())?;
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
            last_checkpoint(&output)?
        } else {
            PathBuf::from(r)
        };
        trainer
            .resume_from_checkpoint(&dir)
            .map_err(|e| e.to_string())?;
        eprintln!("resuming from {}", dir.display());
    }
    trainer.train(&mut on_event).map_err(|e| e.to_string())?;
    bar.finish();
    trainer.save(&output).map_err(|e| e.to_string())?;
    eprintln!("saved to {}", output.display());
    Ok(())
}
