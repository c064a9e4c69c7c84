//! openraft's own storage conformance suite, run against the redb stores on real files.

use flotilla_consensus::kv::KvStore;
use flotilla_consensus::store::{self, LogStore, StateMachineStore};
use flotilla_consensus::types::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for RedbBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let stores = store::open(dir.path(), KvStore::default())?;
        Ok((dir, stores.log, stores.state_machine))
    }
}

/// `Suite::test_all` builds its own runtime per case, so this is a plain test, not a tokio one.
#[test]
fn redb_stores_pass_the_openraft_storage_suite() {
    if let Err(e) = Suite::test_all(RedbBuilder) {
        panic!("storage suite failed: {e}");
    }
}
