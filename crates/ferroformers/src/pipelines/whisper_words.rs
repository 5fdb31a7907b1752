//! Word-level timestamps for Whisper (`return_timestamps="word"`), as transformers 4.57:
//! token times from the cross-attention of the alignment heads and dynamic time warping
//! (`WhisperGenerationMixin._extract_token_timestamps`), and tokens grouped into words
//! (`tokenization_whisper._collate_word_timestamps` and the helpers it calls).

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// Python's `x[:end]` length for a sequence of `len` items (`end` may be negative).
fn py_slice_end(end: i64, len: usize) -> usize {
    if end < 0 {
        (len as i64 + end).max(0) as usize
    } else {
        (end as usize).min(len)
    }
}

/// Python's `//` for integers.
fn floor_div(a: i64, b: i64) -> i64 {
    a.div_euclid(b)
}

/// Token times in seconds for a sequence of `total` tokens whose first `num_input` are the
/// decoder's start tokens, from `weights` `[head][row][source position]`: the alignment heads'
/// cross-attention for the tokens `0..total - 1` (the last token has none). `num_frames` is
/// the window's frames (HF's `attention_mask.sum() - seek`, negative past the audio; cropped
/// as HF's Python slicing does). Start tokens get 0; the last token repeats the time before it.
pub fn token_timestamps(
    weights: &[Vec<Vec<f32>>],
    num_input: usize,
    total: usize,
    num_frames: i64,
    median_filter_width: usize,
    time_precision: f64,
) -> Vec<f32> {
    let mut out = vec![0f32; total];
    let rows = total.saturating_sub(1).saturating_sub(num_input);
    if rows == 0 || weights.is_empty() {
        return out;
    }
    let heads = weights.len();
    let src = weights[0].first().map_or(0, |r| r.len());
    // `weights[..., :num_frames // 2]`, then the same slice again per batch row.
    let half = floor_div(num_frames, 2);
    let frames = py_slice_end(half, py_slice_end(half, src));
    // Normalise over tokens (population std), median filter over time, mean over heads.
    let mut matrix = vec![vec![0f32; frames]; rows];
    for w in weights {
        let m: Vec<&[f32]> = (0..rows).map(|r| &w[num_input + r][..frames]).collect();
        let mut norm = vec![vec![0f32; frames]; rows];
        for f in 0..frames {
            let mean = m.iter().map(|r| r[f]).sum::<f32>() / rows as f32;
            let var = m.iter().map(|r| (r[f] - mean) * (r[f] - mean)).sum::<f32>() / rows as f32;
            let std = var.sqrt();
            for r in 0..rows {
                norm[r][f] = (m[r][f] - mean) / std;
            }
        }
        for (r, row) in norm.iter().enumerate() {
            let filtered = median_filter(row, median_filter_width);
            for (acc, v) in matrix[r].iter_mut().zip(filtered) {
                *acc += v;
            }
        }
    }
    for row in &mut matrix {
        for v in row.iter_mut() {
            *v /= heads as f32;
        }
    }
    let neg: Vec<Vec<f64>> = matrix
        .iter()
        .map(|r| r.iter().map(|&v| -(v as f64)).collect())
        .collect();
    let (text, time) = dynamic_time_warping(&neg, rows, frames);
    let mut jumps = Vec::with_capacity(rows);
    for k in 0..text.len() {
        if k == 0 || text[k] != text[k - 1] {
            jumps.push(time[k] as f64 * time_precision);
        }
    }
    for (k, t) in jumps.iter().enumerate() {
        out[num_input + k] = *t as f32;
    }
    if let Some(&last) = jumps.last() {
        out[total - 1] = last as f32;
    }
    out
}

/// `_median_filter` over one row: reflect padding of `width / 2` (none when the row is not
/// longer than that), the middle of each sorted window (NaN sorts last, as torch's sort).
fn median_filter(row: &[f32], width: usize) -> Vec<f32> {
    let pad = width / 2;
    if row.len() <= pad || width == 0 {
        return row.to_vec();
    }
    let n = row.len();
    let at = |i: isize| -> f32 {
        let j = if i < 0 {
            (-i) as usize
        } else if i as usize >= n {
            2 * (n - 1) - i as usize
        } else {
            i as usize
        };
        row[j]
    };
    let mut win = vec![0f32; width];
    (0..n)
        .map(|c| {
            for (k, w) in win.iter_mut().enumerate() {
                *w = at(c as isize + k as isize - pad as isize);
            }
            win.sort_by(|a, b| match (a.is_nan(), b.is_nan()) {
                (true, true) => std::cmp::Ordering::Equal,
                (true, false) => std::cmp::Ordering::Greater,
                (false, true) => std::cmp::Ordering::Less,
                _ => a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal),
            });
            win[pad]
        })
        .collect()
}

/// `_dynamic_time_warping` (costs kept in float32 as numpy does there): the text and time
/// index of each step of the path.
fn dynamic_time_warping(matrix: &[Vec<f64>], rows: usize, cols: usize) -> (Vec<i64>, Vec<i64>) {
    let w = cols + 1;
    let mut cost = vec![f32::INFINITY; (rows + 1) * w];
    let mut trace = vec![-1i8; (rows + 1) * w];
    cost[0] = 0.0;
    for j in 1..=cols {
        for i in 1..=rows {
            let c0 = cost[(i - 1) * w + j - 1];
            let c1 = cost[(i - 1) * w + j];
            let c2 = cost[i * w + j - 1];
            let (c, t) = if c0 < c1 && c0 < c2 {
                (c0, 0)
            } else if c1 < c0 && c1 < c2 {
                (c1, 1)
            } else {
                (c2, 2)
            };
            cost[i * w + j] = (matrix[i - 1][j - 1] + c as f64) as f32;
            trace[i * w + j] = t;
        }
    }
    trace[..w].fill(2);
    for i in 0..=rows {
        trace[i * w] = 1;
    }
    let (mut i, mut j) = (rows, cols);
    let (mut text, mut time) = (Vec::new(), Vec::new());
    while i > 0 || j > 0 {
        text.push(i as i64 - 1);
        time.push(j as i64 - 1);
        match trace[i * w + j] {
            0 => {
                i -= 1;
                j -= 1;
            }
            1 => i -= 1,
            _ => j -= 1,
        }
    }
    text.reverse();
    time.reverse();
    (text, time)
}

/// Python's `round(x, 2)` (correctly rounded from the binary value).
pub fn round2(x: f64) -> f64 {
    format!("{x:.2}").parse().unwrap_or(x)
}

const PREPEND: &str = "\"'“¡¿([{-";
const APPEND: &str = "\"'.。,，!！?？:：”)]}、";
const PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

type Groups = (Vec<String>, Vec<Vec<u32>>, Vec<Vec<usize>>);

/// `_split_tokens_on_unicode`: cut where the tokens decoded so far are whole code points.
fn split_on_unicode(tokenizer: &Tokenizer, tokens: &[u32]) -> Result<Groups> {
    let full: Vec<char> = tokenizer.decode(tokens, false)?.chars().collect();
    let (mut words, mut word_tokens, mut indices) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cur, mut cur_idx) = (Vec::new(), Vec::new());
    let mut offset = 0usize;
    for (k, &t) in tokens.iter().enumerate() {
        cur.push(t);
        cur_idx.push(k);
        let decoded = tokenizer.decode(&cur, false)?;
        let chars: Vec<char> = decoded.chars().collect();
        let whole = match chars.iter().position(|&c| c == '\u{fffd}') {
            None => true,
            Some(p) => full.get(offset + p) == Some(&'\u{fffd}'),
        };
        if whole {
            offset += chars.len();
            words.push(decoded);
            word_tokens.push(std::mem::take(&mut cur));
            indices.push(std::mem::take(&mut cur_idx));
        }
    }
    Ok((words, word_tokens, indices))
}

/// `_split_tokens_on_spaces`: subwords joined until a space, punctuation or special token.
fn split_on_spaces(tokenizer: &Tokenizer, tokens: &[u32], eos: u32) -> Result<Groups> {
    let (subwords, sub_tokens, sub_idx) = split_on_unicode(tokenizer, tokens)?;
    let (mut words, mut word_tokens, mut indices): Groups = (Vec::new(), Vec::new(), Vec::new());
    for ((sw, st), si) in subwords.into_iter().zip(sub_tokens).zip(sub_idx) {
        let special = st[0] >= eos;
        let with_space = sw.starts_with(' ');
        let punctuation = PUNCTUATION.contains(sw.trim());
        if special || with_space || punctuation || words.is_empty() {
            words.push(sw);
            word_tokens.push(st);
            indices.push(si);
        } else if let (Some(w), Some(t), Some(i)) =
            (words.last_mut(), word_tokens.last_mut(), indices.last_mut())
        {
            w.push_str(&sw);
            t.extend(st);
            i.extend(si);
        }
    }
    Ok((words, word_tokens, indices))
}

/// `_merge_punctuations`.
fn merge_punctuations(g: &mut Groups) {
    let (words, tokens, indices) = g;
    let n = words.len();
    if n >= 2 {
        let mut i = n as isize - 2;
        let mut j = n - 1;
        while i >= 0 {
            let iu = i as usize;
            if words[iu].starts_with(' ') && PREPEND.contains(words[iu].trim()) {
                words[j] = format!("{}{}", words[iu], words[j]);
                let t = std::mem::take(&mut tokens[iu]);
                tokens[j] = [t, std::mem::take(&mut tokens[j])].concat();
                let x = std::mem::take(&mut indices[iu]);
                indices[j] = [x, std::mem::take(&mut indices[j])].concat();
                words[iu].clear();
            } else {
                j = iu;
            }
            i -= 1;
        }
    }
    let (mut i, mut j) = (0usize, 1usize);
    while j < words.len() {
        if !words[i].ends_with(' ') && APPEND.contains(words[j].as_str()) {
            let w = std::mem::take(&mut words[j]);
            words[i].push_str(&w);
            let t = std::mem::take(&mut tokens[j]);
            tokens[i].extend(t);
            let x = std::mem::take(&mut indices[j]);
            indices[i].extend(x);
        } else {
            i = j;
        }
        j += 1;
    }
    words.retain(|w| !w.is_empty());
    tokens.retain(|t| !t.is_empty());
    indices.retain(|x| !x.is_empty());
}

/// `_collate_word_timestamps`: each word's text and `(start of its first token, end of its
/// last)`. `language` is the language's name (`english`); languages written without spaces
/// are cut at code points.
pub fn collate_words(
    tokenizer: &Tokenizer,
    tokens: &[u32],
    times: &[(f64, f64)],
    language: Option<&str>,
    eos: u32,
) -> Result<Vec<(String, (f64, f64))>> {
    let language = language.unwrap_or("english");
    let mut groups = if matches!(
        language,
        "chinese" | "japanese" | "thai" | "lao" | "myanmar" | "cantonese"
    ) {
        split_on_unicode(tokenizer, tokens)?
    } else {
        split_on_spaces(tokenizer, tokens, eos)?
    };
    merge_punctuations(&mut groups);
    let (words, _, indices) = groups;
    Ok(words
        .into_iter()
        .zip(indices)
        .map(|(w, idx)| {
            let start = times[idx[0]].0;
            let end = times[idx[idx.len() - 1]].1;
            (w, (start, end))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtw_matches_transformers_path() {
        // Two tokens, four frames: token 0 on frames 0-1, token 1 on frames 2-3 (the path
        // transformers' `_dynamic_time_warping` returns for this matrix).
        let m = vec![vec![-1.0, -1.0, 0.0, 0.0], vec![0.0, 0.0, -1.0, -1.0]];
        let (text, time) = dynamic_time_warping(&m, 2, 4);
        assert_eq!(text, vec![0, 0, 1, 1, 1]);
        assert_eq!(time, vec![0, 1, 1, 2, 3]);
        // No frames: every token at frame -1, as numpy's backtrace gives.
        let (text, time) = dynamic_time_warping(&[vec![], vec![]], 2, 0);
        assert_eq!((text, time), (vec![0, 1], vec![-1, -1]));
    }

    #[test]
    fn median_filter_reflects_at_the_edges() {
        let row = [5.0, 1.0, 2.0, 9.0, 3.0];
        // Width 3: windows [1,5,1] [5,1,2] [1,2,9] [2,9,3] [9,3,9].
        assert_eq!(median_filter(&row, 3), vec![1.0, 2.0, 2.0, 3.0, 9.0]);
        assert_eq!(median_filter(&row[..1], 3), vec![5.0]);
    }

    #[test]
    fn python_slices_and_rounding() {
        assert_eq!(py_slice_end(100, 1500), 100);
        assert_eq!(py_slice_end(-1261, 1500), 239);
        assert_eq!(py_slice_end(-1261, 239), 0);
        assert_eq!(py_slice_end(2000, 1500), 1500);
        assert_eq!(floor_div(-2521, 2), -1261);
        assert_eq!(round2(0.11999999731779099), 0.12);
        assert_eq!(round2(27.200000762939453), 27.2);
    }
}
