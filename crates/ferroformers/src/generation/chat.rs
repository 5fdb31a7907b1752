//! Chat templates: a model's Jinja `chat_template` rendered with minijinja the way HF's
//! `apply_chat_template` renders it (trim_blocks, lstrip_blocks, loop controls, `tojson`,
//! `raise_exception`, `strftime_now`, the special tokens as variables, Python string methods).

use minijinja::{context, Environment, Error as JinjaError, ErrorKind, Value as JValue};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat message, `{"role": .., "content": ..}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template plus the special tokens it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

fn raise_exception(msg: String) -> std::result::Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(_format: String) -> std::result::Result<String, JinjaError> {
    // Dates in templates are cosmetic ("Today is ..."); keep output reproducible.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    Ok(format!("{:02} {} {}", d, MONTHS[(m - 1) as usize], y))
}

impl ChatTemplate {
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let t = Self {
            source: source.into(),
            bos_token: None,
            eos_token: None,
            unk_token: None,
            pad_token: None,
        };
        // Compile once up front so a broken template is reported at load time.
        t.env()?;
        Ok(t)
    }

    fn env(&self) -> Result<Environment<'_>> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template("chat", &self.source)
            .map_err(|e| Error::Tokenizer(format!("invalid chat template: {e}")))?;
        Ok(env)
    }

    /// Whether the template names `role` itself (compares a message's role with it): OpenAI's
    /// `developer` role is one that most templates do not know.
    pub fn knows_role(&self, role: &str) -> bool {
        self.source.contains(&format!("'{role}'")) || self.source.contains(&format!("\"{role}\""))
    }

    /// Render `messages`; `add_generation_prompt` opens the assistant's turn.
    /// `continue_final_message` cuts the text right after the last message's content, so the
    /// model continues it (HF's prefill).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        continue_final_message: bool,
    ) -> Result<String> {
        let env = self.env()?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let tok = |t: &Option<String>| JValue::from(t.clone().unwrap_or_default());
        let rendered = tmpl
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => tok(&self.bos_token),
                eos_token => tok(&self.eos_token),
                unk_token => tok(&self.unk_token),
                pad_token => tok(&self.pad_token),
                tools => JValue::from(()),
                documents => JValue::from(()),
            })
            .map_err(|e| {
                let mut msg = e.to_string();
                if let Some(d) = e.detail() {
                    msg = format!("{msg}: {d}");
                }
                Error::input(0, format!("chat template: {msg}"))
            })?;
        if continue_final_message {
            let last = messages
                .last()
                .map(|m| m.content.trim())
                .unwrap_or_default();
            if let Some(at) = rendered.rfind(last) {
                return Ok(rendered[..at + last.len()].to_string());
            }
            return Err(Error::input(
                0,
                "continue_final_message: the final message is not in the rendered chat",
            ));
        }
        Ok(rendered)
    }
}

#[cfg(test)]
mod tests {
    /// A template names the roles it compares with; OpenAI's `developer` is rarely one.
    #[test]
    fn knows_the_roles_its_source_names() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'system' %}S{% elif m.role == \"developer\" %}D{% endif %}{% endfor %}",
        )
        .unwrap();
        assert!(t.knows_role("system") && t.knows_role("developer"));
        assert!(!t.knows_role("tool"));
    }

    use super::*;

    const CHATML: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_and_raises() {
        let mut t = ChatTemplate::new(CHATML).unwrap();
        t.bos_token = Some("<s>".into());
        let out = t
            .render(&[Message::new("user", "Hi")], true, false)
            .unwrap();
        assert_eq!(
            out,
            "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let err = t
            .render(&[Message::new("robot", "Hi")], true, false)
            .unwrap_err();
        assert!(err.to_string().contains("unknown role: robot"), "{err}");
        let out = t
            .render(
                &[Message::new("user", "Hi"), Message::new("assistant", "Hel")],
                false,
                true,
            )
            .unwrap();
        assert!(out.ends_with("assistant\nHel"), "{out}");
    }

    #[test]
    fn python_methods_and_trim_blocks() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {{ m['content'].strip() | upper }}|{% endfor %}",
        )
        .unwrap();
        let out = t
            .render(&[Message::new("user", "  hi ")], false, false)
            .unwrap();
        // trim_blocks eats the newline after `{% for %}`; lstrip_blocks only strips before
        // block tags, so the indentation before `{{` stays (as in Jinja2).
        assert_eq!(out, "  HI|");
    }
}
