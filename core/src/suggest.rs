//! "Did you mean …?" suggestions for misspelt names.

/// Returns the candidate closest to `word`, if one is close enough to be a plausible typo.
///
/// Closeness is Jaro–Winkler similarity (it favours a shared prefix, which is how people
/// mistype keys); `0.8` keeps `imgae → image` and `biuld → build` while refusing unrelated
/// words.
pub fn did_you_mean<'a, I>(word: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// Formats `"; did you mean `x`?"` or nothing, for appending to a message.
pub fn hint<'a, I>(word: &str, candidates: I) -> String
where
    I: IntoIterator<Item = &'a str>,
{
    did_you_mean(word, candidates)
        .map(|c| format!("; did you mean `{c}`?"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_closest_key_for_a_transposition() {
        assert_eq!(
            did_you_mean("imgae", ["image", "needs", "steps"]),
            Some("image")
        );
        assert_eq!(did_you_mean("biuld", ["build", "test"]), Some("build"));
    }

    #[test]
    fn suggests_nothing_for_an_unrelated_word() {
        assert_eq!(did_you_mean("zebra", ["image", "needs", "steps"]), None);
        assert_eq!(hint("zebra", ["image"]), "");
    }
}
