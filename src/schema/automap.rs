//! Auto-map: pair the fields of two entities by name, ignoring case, `_`, `-` and
//! spaces (`CustomerId`, `customer_id` and `customer id` are one name).

use super::Mapping;
use crate::EntityInfo;

/// What auto-map found: the mappings (in source field order, without transforms; the
/// validator says where types need one) and the fields left over on each side.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoMap {
    pub mappings: Vec<Mapping>,
    pub unmapped_source: Vec<String>,
    pub unmapped_destination: Vec<String>,
}

fn squash(name: &str) -> String {
    name.chars()
        .filter(|c| !matches!(c, '_' | '-' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

/// Pairs each source field with at most one destination field and the other way round.
/// An exact name match is taken first, so `id`→`id` wins over `ID`→`id` when a source
/// has both; then the first unpaired field with the same squashed name.
pub fn automap(source: &EntityInfo, destination: &EntityInfo) -> AutoMap {
    let mut pair: Vec<Option<usize>> = vec![None; source.fields.len()];
    let mut taken = vec![false; destination.fields.len()];
    let exact = |s: &str, d: &str| s == d;
    let loose = |s: &str, d: &str| squash(s) == squash(d);
    for same in [&exact as &dyn Fn(&str, &str) -> bool, &loose] {
        for (i, field) in source.fields.iter().enumerate() {
            if pair[i].is_some() {
                continue;
            }
            let found = destination
                .fields
                .iter()
                .enumerate()
                .position(|(j, d)| !taken[j] && same(&field.name, &d.name));
            if let Some(j) = found {
                pair[i] = Some(j);
                taken[j] = true;
            }
        }
    }
    let mut result = AutoMap {
        mappings: Vec::new(),
        unmapped_source: Vec::new(),
        unmapped_destination: Vec::new(),
    };
    for (field, paired) in source.fields.iter().zip(&pair) {
        match paired {
            Some(j) => result.mappings.push(Mapping::new(
                &field.name,
                &destination.fields[*j].name,
                None,
            )),
            None => result.unmapped_source.push(field.name.clone()),
        }
    }
    for (field, used) in destination.fields.iter().zip(&taken) {
        if !used {
            result.unmapped_destination.push(field.name.clone());
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FieldInfo, FieldType};

    fn entity(name: &str, fields: &[&str]) -> EntityInfo {
        EntityInfo {
            name: name.into(),
            fields: fields
                .iter()
                .map(|f| FieldInfo {
                    name: f.to_string(),
                    field_type: FieldType::Text,
                    nullable: true,
                })
                .collect(),
        }
    }

    fn pairs(map: &AutoMap) -> Vec<(String, String)> {
        map.mappings
            .iter()
            .map(|m| (m.source.join("+"), m.destination.clone()))
            .collect()
    }

    #[test]
    fn pairs_ignoring_case_underscores_dashes_and_spaces() {
        let source = entity(
            "people",
            &["CustomerId", "full_name", "e-mail", "Zip Code", "notes"],
        );
        let destination = entity(
            "customers",
            &["customer_id", "FullName", "email", "zipcode", "age"],
        );
        let map = automap(&source, &destination);
        let expected = [
            ("CustomerId", "customer_id"),
            ("full_name", "FullName"),
            ("e-mail", "email"),
            ("Zip Code", "zipcode"),
        ];
        assert_eq!(
            pairs(&map),
            expected
                .iter()
                .map(|(s, d)| (s.to_string(), d.to_string()))
                .collect::<Vec<_>>()
        );
        assert!(map.mappings.iter().all(|m| m.transform.is_none()));
        assert_eq!(map.unmapped_source, ["notes"]);
        assert_eq!(map.unmapped_destination, ["age"]);
    }

    #[test]
    fn exact_names_win_and_each_field_is_used_once() {
        let source = entity("s", &["ID", "id"]);
        let destination = entity("d", &["id"]);
        let map = automap(&source, &destination);
        assert_eq!(pairs(&map), [("id".to_string(), "id".to_string())]);
        assert_eq!(map.unmapped_source, ["ID"]);
        assert!(map.unmapped_destination.is_empty());
    }

    #[test]
    fn nothing_in_common_leaves_everything_unmapped() {
        let map = automap(&entity("s", &["a"]), &entity("d", &["b"]));
        assert!(map.mappings.is_empty());
        assert_eq!(map.unmapped_source, ["a"]);
        assert_eq!(map.unmapped_destination, ["b"]);
    }
}
