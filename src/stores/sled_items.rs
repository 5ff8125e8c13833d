use crate::metadata::{Commit, MetadataStore};
use crate::model::ItemId;
use crate::sync::ItemStore;

/// The built-in item store: values live in the metadata store's own sled tree, so a
/// change's data commits in the same atomic batch as its metadata.
#[derive(Clone, Copy, Debug, Default)]
pub struct SledItems;

impl ItemStore for SledItems {
    fn data_in_record(&self) -> bool {
        true
    }

    fn read(&self, metadata: &MetadataStore, item: &ItemId) -> Result<Option<Vec<u8>>, String> {
        metadata.data(item).map_err(|e| e.to_string())
    }

    fn stage(
        &mut self,
        commit: &mut Commit,
        item: &ItemId,
        data: Option<&[u8]>,
    ) -> Result<(), String> {
        match data {
            Some(data) => commit.put_data(item, data),
            None => commit.remove_data(item),
        }
        Ok(())
    }
}
