//! The map half of a word count: counts the words of its input (any text) and returns one
//! `word<TAB>count` line per word, sorted by word. Words are runs of letters, digits and
//! apostrophes, lowercased.

use std::collections::BTreeMap;

struct Map;

impl agora_guest::Task for Map {
    fn run(input: Vec<u8>) -> Result<Vec<u8>, String> {
        let text = String::from_utf8(input).map_err(|e| format!("the input is not UTF-8: {e}"))?;
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for word in text
            .split(|c: char| !(c.is_alphanumeric() || c == '\''))
            .filter(|w| !w.is_empty())
        {
            *counts.entry(word.to_lowercase()).or_default() += 1;
        }
        agora_guest::info(&format!(
            "{} distinct words in {} bytes",
            counts.len(),
            text.len()
        ));
        let mut out = String::new();
        for (word, n) in counts {
            out.push_str(&format!("{word}\t{n}\n"));
        }
        Ok(out.into_bytes())
    }
}

agora_guest::export_task!(Map);
