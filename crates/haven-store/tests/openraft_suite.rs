//! openraft's own storage conformance suite, run against the redb-backed store.

use haven_store::{LogStore, StateMachineStore, TypeConfig};
use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| {
            StorageError::from(openraft::StorageIOError::write(openraft::AnyError::new(&e)))
        })?;
        let (log, sm) = haven_store::open(&dir.path().join("state.redb")).map_err(|e| {
            StorageError::from(openraft::StorageIOError::write(openraft::AnyError::new(&e)))
        })?;
        Ok((dir, log, sm))
    }
}

#[test]
fn the_redb_store_passes_the_openraft_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("openraft storage suite failed: {e}");
    }
}
