//! The reduce half of a word count: merges `word<TAB>count` lines (the mappers' outputs,
//! concatenated) and returns the totals, most frequent first (ties by word).

use std::collections::HashMap;

struct Reduce;

impl agora_guest::Task for Reduce {
    fn run(input: Vec<u8>) -> Result<Vec<u8>, String> {
        let text = String::from_utf8(input).map_err(|e| format!("the input is not UTF-8: {e}"))?;
        let mut totals: HashMap<&str, u64> = HashMap::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
            let (word, n) = line
                .split_once('\t')
                .ok_or_else(|| format!("line {}: expected word<TAB>count, got {line:?}", i + 1))?;
            let n: u64 = n
                .parse()
                .map_err(|_| format!("line {}: {n:?} is not a count", i + 1))?;
            *totals.entry(word).or_default() += n;
        }
        let mut sorted: Vec<(&str, u64)> = totals.into_iter().collect();
        sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        agora_guest::info(&format!("{} words in all", sorted.len()));
        let mut out = String::new();
        for (word, n) in sorted {
            out.push_str(&format!("{word}\t{n}\n"));
        }
        Ok(out.into_bytes())
    }
}

agora_guest::export_task!(Reduce);
