//! A light load generator for streamed OpenAI chat completions: `concurrency` blocking client
//! threads (each asleep on its socket between events) send `requests` streamed requests in all
//! and time each one's first content event. A Python asyncio client on the same 2 cores needed
//! ~3 ms of CPU per request start: a wave of 16 reached the server spread over ~40 ms, which
//! its time to first token then counted. This one costs the server's cores almost nothing.
//!
//! ```text
//! cargo run --release -p ferroformers-server --example sse_load -- \
//!     URL BODY_JSON CONCURRENCY REQUESTS
//! ```
//! BODY_JSON is the request body (`"stream": true` is set); `{i}` in it becomes each request's
//! number (0, 1, ...), for prompts that differ, and `{r:A-B}` a number from A to B fixed per
//! request number (`"max_tokens": {r:32-96}`: answers of mixed lengths). Prints one JSON object: wall
//! seconds, completion tokens (from the usage chunk when the server sends one, else content
//! events), and every request's time to first content event in seconds (`ttft_s`) with
//! when it was sent, in seconds from the start (`start_s`, in the same order).

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{json, Value};

/// One streamed request: (seconds to the first content event, completion tokens).
fn one(agent: &ureq::Agent, url: &str, body: &Value) -> Result<(f64, u64), String> {
    let t0 = Instant::now();
    let resp = agent
        .post(url)
        .send_json(body.clone())
        .map_err(|e| e.to_string())?;
    let mut ttft = None;
    let (mut events, mut usage) = (0u64, None);
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.map_err(|e| format!("reading the stream: {e}"))?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value =
            serde_json::from_str(data).map_err(|e| format!("event is not JSON ({e}): {data}"))?;
        if let Some(n) = chunk
            .pointer("/usage/completion_tokens")
            .and_then(Value::as_u64)
        {
            usage = Some(n);
        }
        let content = chunk
            .pointer("/choices/0/delta/content")
            .or_else(|| chunk.pointer("/choices/0/text"))
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty());
        if content {
            events += 1;
            ttft.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        }
    }
    Ok((ttft.unwrap_or(f64::NAN), usage.unwrap_or(events)))
}

/// `text` with each `{r:A-B}` replaced by a number from A to B, the same for the same request
/// number `i` in every run (a fixed hash of `i` and the field's place): answers of mixed
/// lengths (`"max_tokens": {r:32-96}`), so requests end and arrive at different steps.
fn spread(text: &str, i: usize) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut field = 0u64;
    while let Some(at) = rest.find("{r:") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 3..];
        let range = tail.find('}').and_then(|end| {
            let (a, b) = tail[..end].split_once('-')?;
            Some((
                a.trim().parse::<u64>().ok()?,
                b.trim().parse::<u64>().ok()?,
                end,
            ))
        });
        let Some((a, b, end)) = range.filter(|(a, b, _)| a <= b) else {
            eprintln!("BODY_JSON: `{{r:A-B}}` needs whole numbers A <= B");
            std::process::exit(2)
        };
        // splitmix64 of (request, field)
        let mut z = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ field.wrapping_add(0x632B_E59B_D9B4_E019);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.push_str(&(a + z % (b - a + 1)).to_string());
        field += 1;
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, body, conc, n] = args.as_slice() else {
        eprintln!("usage: sse_load URL BODY_JSON CONCURRENCY REQUESTS");
        std::process::exit(2);
    };
    // Each request's body: `{i}` replaced by its number.
    let body_of = |i: usize| -> Value {
        let text = spread(&body.replace("{i}", &i.to_string()), i);
        let mut body: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            eprintln!("BODY_JSON is not JSON: {e}");
            std::process::exit(2)
        });
        body["stream"] = json!(true);
        body
    };
    body_of(0);
    let (Ok(conc), Ok(n)) = (conc.parse::<usize>(), n.parse::<usize>()) else {
        eprintln!("CONCURRENCY and REQUESTS must be whole numbers");
        std::process::exit(2)
    };
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(n));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..conc.max(1) {
            s.spawn(|| {
                let agent = ureq::AgentBuilder::new().build();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let start = t0.elapsed().as_secs_f64();
                    let r = one(&agent, url, &body_of(i));
                    results.lock().unwrap().push((start, r));
                }
            });
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    let results = results.into_inner().unwrap();
    let (mut ttfts, mut starts) = (Vec::new(), Vec::new());
    let mut tokens = 0;
    for (start, r) in results {
        match r {
            Ok((t, k)) => {
                ttfts.push(t);
                starts.push(start);
                tokens += k;
            }
            Err(e) => {
                eprintln!("request failed: {e}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "{}",
        json!({"wall_s": wall, "tokens": tokens, "ttft_s": ttfts, "start_s": starts})
    );
}
