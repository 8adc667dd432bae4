//! The install engine: the pipeline from a verified bundle to a committed
//! or rolled-back release (`install`), its pure decisions (`decide`:
//! strategy, recovery, restoring the boot), and the persisted state with
//! the journal of the install in progress (`state`); what it is opened
//! with (`settings`).

pub(crate) mod decide;
pub(crate) mod install;
pub(crate) mod settings;
pub(crate) mod state;
