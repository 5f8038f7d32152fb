//! openraft's storage conformance suite against the redb store.

use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

use super::support::Tally;
use crate::store::{LogStore, StateMachineStore, open};
use crate::types::TypeConfig;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore<Tally>, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, StateMachineStore<Tally>), StorageError<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let (log, sm) = open::<Tally>(dir.path()).unwrap();
        Ok((dir, log, sm))
    }
}

#[test]
fn redb_store_passes_openraft_suite() {
    Suite::test_all(Builder).unwrap();
}
