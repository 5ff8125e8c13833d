//! Did-you-mean suggestions for misspelt names (Levenshtein distance, by hand: the
//! candidate lists are a few dozen names, so the quadratic table costs nothing).

/// The edit distance (insertions, deletions, substitutions) between two strings, by char.
pub(crate) fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    // `row[j]` holds the distance between the prefix of `a` read so far and `b[..j]`.
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            let substitution = diagonal + usize::from(ca != *cb);
            row[j + 1] = substitution.min(above + 1).min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The closest candidate within distance 2, the earliest on a tie. Case is ignored in
/// the distance, since a person who typed `Full_Name` meant `full_name`.
pub(crate) fn closest<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let name = name.to_lowercase();
    let mut best: Option<(usize, &str)> = None;
    for candidate in candidates {
        let distance = levenshtein(&name, &candidate.to_lowercase());
        if distance <= 2 && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, c)| c)
}

/// `did you mean "full_name"?` for the closest candidate, if one is close enough.
pub(crate) fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    closest(name, candidates).map(|c| format!("did you mean {c:?}?"))
}

/// A suggestion for an enum value: the closest allowed value (ignoring case, `_`, `-`
/// and spaces), a known synonym, or else the list of allowed values, so a person always
/// learns what to write.
pub(crate) fn enum_suggestion(value: &str, allowed: &[&str], synonyms: &[(&str, &str)]) -> String {
    let squash = |s: &str| {
        s.chars()
            .filter(|c| !matches!(c, '_' | '-' | ' '))
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    let wanted = squash(value);
    if let Some((_, target)) = synonyms.iter().find(|(alias, _)| squash(alias) == wanted) {
        return format!("did you mean {target:?}?");
    }
    let mut best: Option<(usize, &str)> = None;
    for candidate in allowed {
        let distance = levenshtein(&wanted, &squash(candidate));
        if distance <= 2 && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    match best {
        Some((_, c)) => format!("did you mean {c:?}?"),
        None => format!(
            "expected one of {}",
            allowed
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levenshtein_counts_edits() {
        assert_eq!(levenshtein("", "abc"), 3);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("fulname", "full_name"), 2);
        assert_eq!(levenshtein("customer_idd", "customer_id"), 1);
        assert_eq!(levenshtein("same", "same"), 0);
    }

    #[test]
    fn closest_ignores_case_and_stops_at_two() {
        let fields = ["id", "full_name", "age"];
        assert_eq!(closest("Full_Name", fields), Some("full_name"));
        assert_eq!(closest("fulname", fields), Some("full_name"));
        assert_eq!(closest("birthday", fields), None);
    }

    #[test]
    fn enum_suggestion_uses_distance_synonyms_then_the_list() {
        let allowed = ["full", "incremental"];
        assert_eq!(
            enum_suggestion("Incremantal", &allowed, &[]),
            r#"did you mean "incremental"?"#
        );
        let directions = ["source_to_destination", "bidirectional"];
        let synonyms = [("one_way", "source_to_destination")];
        assert_eq!(
            enum_suggestion("OneWay", &directions, &synonyms),
            r#"did you mean "source_to_destination"?"#
        );
        assert_eq!(
            enum_suggestion("sideways", &directions, &synonyms),
            r#"expected one of "source_to_destination", "bidirectional""#
        );
    }
}
